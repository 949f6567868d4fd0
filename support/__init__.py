"""Helpers for the tests, the demo and the benchmarks (ComfyUI imported in process, tiny models,
sampling, a ComfyUI server, a browser page, reference implementations). ComfyUI never imports it:
it is not part of the node pack.

Import it with the repository root on sys.path (tests/conftest.py, the scripts and the benchmarks
append it): `from support import tiny_models`, `from support.sampling import ksample`."""
