"""Sampling pieces several methods share: extra batch elements (branches) and the shared prefix,
the DDIM inversion step, and the per-layer entropy registry."""
