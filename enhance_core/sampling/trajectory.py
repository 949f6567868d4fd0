"""A branch's own trajectory beside the sampler's: one latent per level of the run's schedule.

A branch that samples another prompt beside the target (editing's source) either follows the
sampler (an Euler step with plain CFG per level) or is a real video DDIM-inverted up the schedule,
whose last latent may replace the sampler's start.
"""

import math

import torch

import comfy.utils

from .ddim import ddim_inversion_step


def as_sampled(samples):
    """A LATENT's samples as ComfyUI's sampler holds them: an audio-video latent (a NestedTensor of
    streams, LTX-2) packed into one [batch, 1, values] tensor as comfy.utils.pack_latents does it."""
    return comfy.utils.pack_latents(samples.unbind())[0] if getattr(samples, "is_nested", False) else samples


def starts_at_top(model_sampling, sigmas) -> bool:
    """Whether a run on `sigmas` starts at the top of the schedule (ComfyUI's max_denoise): a first
    stage, not one that continues another's latent."""
    top, first = float(model_sampling.sigma_max), float(sigmas[0])
    return math.isclose(top, first, rel_tol=1e-5) or first > top


def euler_cfg_step(x, outputs, cfg: float, sigma, sigma_next):
    """The latent at sigma_next from x at sigma: ComfyUI's CFG (uncond + cfg (cond - uncond), the
    cond alone when outputs has no uncond) and its euler step."""
    cond = outputs[0]
    denoised = cond if len(outputs) == 1 else outputs[1] + (cond - outputs[1]) * cfg
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def invert_up(predict, x, sigmas, model_sampling, levels: dict):
    """x (a clean latent) DDIM-inverted up every level of `sigmas` from 0, each level's latent into
    `levels`; returns the latent at the highest. predict(z, level): the clean-latent prediction."""
    ordered = [float(s) for s in sigmas.flip(0) if float(s) > 0]
    progress = comfy.utils.ProgressBar(len(ordered))
    previous = 0.0
    for level in ordered:
        x, _ = ddim_inversion_step(predict, x, previous, level, model_sampling)
        levels[level] = x
        previous = level
        progress.update(1)
    return x


def noise_for_start(model_sampling, sigma, start, latent_image, max_denoise):
    """The noise that makes the sampler's first latent, noise_scaling(sigma, noise, latent_image),
    equal `start` (noise_scaling is linear in the noise whatever the model's sampling); None where
    the model's sampling does not start from noise."""
    scaling = model_sampling.noise_scaling
    offset = scaling(sigma, torch.zeros_like(start), latent_image, max_denoise)
    slope = scaling(sigma, torch.ones_like(start), latent_image, max_denoise) - offset
    return None if bool((slope == 0).any()) else (start - offset) / slope
