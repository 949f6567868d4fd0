"""EVS: T2I + [T2V] + T2I video refinement (sampler, selective feature injection, latent bridge)."""
