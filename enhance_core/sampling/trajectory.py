"""A branch's own trajectory beside the sampler's: one latent per level of the run's schedule.

A branch that samples another prompt beside the target (editing's source) either follows the
sampler (an Euler step with plain CFG per level) or is a real video DDIM-inverted up the schedule,
whose last latent may replace the sampler's start.
"""

import logging
import math

import torch

import comfy.utils

from .ddim import ddim_inversion_step

log = logging.getLogger(__name__)


def as_sampled(samples):
    """A LATENT's samples as ComfyUI's sampler holds them: an audio-video latent (a NestedTensor of
    streams, LTX-2) packed into one [batch, 1, values] tensor as comfy.utils.pack_latents does it."""
    return comfy.utils.pack_latents(samples.unbind())[0] if getattr(samples, "is_nested", False) else samples


def starts_at_top(model_sampling, sigmas) -> bool:
    """Whether a run on `sigmas` starts at the top of the schedule (ComfyUI's max_denoise): a first
    stage, not one that continues another's latent."""
    top, first = float(model_sampling.sigma_max), float(sigmas[0])
    return math.isclose(top, first, rel_tol=1e-5) or first > top


def euler_cfg_step(x, outputs, cfg: float, sigma, sigma_next, prediction=None):
    """The latent at sigma_next from x at sigma: ComfyUI's CFG (uncond + cfg (cond - uncond), the
    cond alone when outputs has no uncond) and its euler step. prediction(denoised): what the sampler
    makes of the CFG result before its step (a noise mask's blend), if anything."""
    cond = outputs[0]
    denoised = cond if len(outputs) == 1 else outputs[1] + (cond - outputs[1]) * cfg
    denoised = denoised if prediction is None else prediction(denoised)
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


def start_from_inversion(model_sampling, sigmas, start, noise, latent_image, top: bool, what: str):
    """The sampler's noise for a run whose branch was inverted up to `start` (its latent at
    sigmas[0]): at the top of the schedule (top: the sampler's max_denoise) the noise that starts the
    sampler there, else `noise` (a later stage continues from its input). Says which in the log."""
    replaced = noise_for_start(model_sampling, sigmas[0], start, latent_image, top) if top else None
    log.log(logging.WARNING if top and replaced is None else logging.INFO,
            "%s: the source video was inverted up to sigma %.4g; %s", what, float(sigmas[0]),
            "the target starts from the inverted latent, not from the sampler's noise" if replaced is not None
            else "the run starts below the top of the schedule: the target continues from its input" if not top
            else f"this model's sampling ({type(model_sampling).__name__}) does not start from noise: the target "
            "starts where the sampler starts, not from the inverted source")
    return noise if replaced is None else replaced
