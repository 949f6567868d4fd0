"""Helpers that drive ComfyUI's own sampling code on tiny models."""

import torch


def text_conditioning(tokens: int = 8, dim: int = 4096, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=g), {}]]


def video_latent(frames: int = 5, height: int = 16, width: int = 16, channels: int = 16, batch: int = 1):
    return {"samples": torch.zeros(batch, channels, frames, height, width)}


def ksample(model, latent, positive, negative, steps=3, cfg=5.0, seed=0, sampler="euler", scheduler="simple", denoise=1.0):
    """Run ComfyUI's KSampler node and return the sampled latent tensor."""
    import nodes
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=denoise)
    return out["samples"]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far `a` is from `b`: the norm of their difference over the norm of `b`."""
    return float((a - b).norm() / b.norm())


def relative_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two results, relative to the largest value of `b`."""
    return float((a - b).abs().max() / b.abs().max())


def force_unbatched(monkeypatch):
    """Make ComfyUI run cond, uncond (and any extra conds) as separate model calls, as it does when
    memory is short. 0.3.75 asks comfy.model_management for free memory, newer ComfyUI the patcher."""
    import comfy.model_management
    import comfy.model_patcher
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 0)
    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda *a, **k: 0)


def counting_model_calls(model):
    """A clone of `model` and the list it appends the batch size of every diffusion-model call to."""
    import comfy.patcher_extension
    m = model.clone()
    calls = []

    def wrapper(executor, x, *a, **kw):
        calls.append(x.shape[0])
        return executor(x, *a, **kw)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count_model_calls", wrapper)
    return m, calls
