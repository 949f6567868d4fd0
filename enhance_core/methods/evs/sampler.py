"""EVS (Su et al.): T2I + [T2V] + T2I refinement of a video with an image model and a video model.

Algorithm 1 on ComfyUI's own sampling. Timesteps are counted down each model's schedule as in the
paper: with an image schedule of `steps` levels, level t sits at sigmas[steps - t] and level 0 is
the clean end.

1. SDEdit with the image model: noise the frames to level t1 = strength x steps (rounded half up) with the
   image model's noise scaling, run the chosen sampler down to level t_T2V, and take the image
   model's x0 prediction there (x0_I).
2. [T2V] block: noise x0_I to level t_V of the video schedule with the video model's noise scaling
   (or DDIM-invert it with the video model, Selective Feature Injection), run n_V video steps, and
   take the video model's x0 prediction at level t_V - n_V (x0_IV; at level 0 that is the sample).
3. Re-noise x0_IV to level t_T2V with the image model's noise scaling (fresh noise) and finish the
   image run. Eq. (8)-(10) of the paper: the image model is evaluated at level t_T2V twice, once
   for x0_I and once after the block (Algorithm 1 re-noises to t_T2V, not to the level below it).

The two models meet only through x0 predictions (a bridge moves them between latent spaces, see
latent_bridge.py); each keeps its own model sampling and schedule. Noise for the three noisings is
drawn from one CPU generator seeded with `seed`, in this order: image stage 1 (image-latent shape),
[T2V] block (video-latent shape, drawn even when SFI inverts instead), image stage 3.
"""

import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ...models import adapter_for
from ...sampling.ddim import ddim_inversion_step
from .feature_injection import SelectiveFeatureInjection
from .latent_bridge import make_bridge
from .schedule import SFI_SETTINGS, Stage, evs_schedule, sfi_layers_and_gamma

log = logging.getLogger(__name__)
__all__ = ["SFI_SETTINGS", "Stage", "evs_sample"]


class _EVSGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider that tells SFI each call's noise level and, while inverting, predicts with
    the positive conditioning alone (DDIM inversion without guidance)."""

    def __init__(self, model_patcher, sfi=None):
        super().__init__(model_patcher)
        self.sfi = sfi
        self.unguided = False

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.sfi is not None:
            self.sfi.sigma = float(timestep.max())
        if self.unguided:
            return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get("positive")], x, timestep, model_options)[0]
        return super().predict_noise(x, timestep, model_options, seed)


def _guider(stage: Stage, sfi=None):
    guider = _EVSGuider(stage.model, sfi)
    guider.set_conds(stage.positive, stage.negative)
    guider.set_cfg(stage.cfg)
    return guider


class _Progress:
    """One ComfyUI progress bar over every model evaluation of every stage, with latent previews
    where ComfyUI gives them; each step is also where an interrupt stops the run."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.pbar = comfy.utils.ProgressBar(total)
        self.previewer = None

    def use_previewer(self, model) -> None:
        try:
            import latent_preview
            self.previewer = latent_preview.get_previewer(model.load_device, model.get_model_object("latent_format"))
        except Exception as e:  # previews are a convenience: never fail a run over them
            log.debug("EVS: no previews (%s)", e)
            self.previewer = None

    def step(self, x0=None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += 1
        preview = None
        if self.previewer is not None and x0 is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.pbar.update_absolute(self.done, self.total, preview)

    def sampler_callback(self, step, x0, x, total_steps):
        self.step(x0)


def _program_sampler(parts, inner, guider=None, sfi=None):
    """A ComfyUI KSAMPLER that runs `parts` in one sampling run, on index ranges into the sigmas it
    is given: ("invert", a, b) DDIM-inverts up sigmas[a..b], ("sample", a, b) runs the chosen
    sampler's own function over sigmas[a..b], ("x0", i) returns the model's x0 prediction at
    sigmas[i]. One run keeps ComfyUI's set-up (model loading, conds) to once per stage."""

    def program(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        for part in parts:
            if part[0] == "sample":
                _, a, b = part
                if b > a:
                    x = inner.sampler_function(model, x, sigmas[a:b + 1], extra_args=extra_args, callback=callback,
                                               disable=disable, **inner.extra_options)
            elif part[0] == "invert":
                _, a, b = part
                guider.unguided = True
                model_sampling = guider.model_patcher.get_model_object("model_sampling")
                if sfi is not None:
                    sfi.mode = "record"
                try:
                    for i in range(a, b):
                        nxt = sigmas[i + 1]
                        x_in = x
                        x, denoised = ddim_inversion_step(lambda z, sigma: model(z, sigma * s_in, **extra_args), x, sigmas[i], nxt,
                                                          model_sampling)
                        if callback is not None:
                            callback({"x": x_in, "i": i, "sigma": nxt, "sigma_hat": nxt, "denoised": denoised})
                finally:
                    guider.unguided = False
                    if sfi is not None:
                        sfi.mode = "inject"
            elif part[0] == "x0":
                i = part[1]
                x = model(x, sigmas[i] * s_in, **extra_args)
                if callback is not None:
                    callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x})
        return x

    return comfy.samplers.KSAMPLER(program)


def _run(guider, noise, latent, sampler, sigmas, progress: _Progress, seed: int):
    out = guider.sample(noise, latent, sampler, sigmas, callback=progress.sampler_callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def evs_sample(image: Stage, video: Stage, latent: dict, strength: float, t_T2V: int, t_V: int, n_V: int,
               seed: int, image_vae=None, video_vae=None, sfi: bool = False, sfi_gamma: float = 0.8,
               sfi_layers: str = "all", sfi_setting: str = SFI_SETTINGS[2]):
    """Run EVS on `latent` (a LATENT dict holding the video in the video model's format).

    Returns (LATENT dict in the video's format, decoded frames [N, H, W, 3] or None without VAEs).
    Every check runs before the first model call."""
    if "noise_mask" in latent:
        raise ValueError("latent: has a noise mask; EVS refines whole frames. Remove the mask (Set Latent Noise Mask)")
    samples = latent["samples"]
    schedule = evs_schedule(image, video, strength, t_T2V, t_V, n_V)
    bridge = make_bridge(image.model, video.model, samples, image_vae, video_vae)
    injector = None
    video_stage = video
    if sfi:
        clone = video.model.clone()
        try:
            n_layers = len(adapter_for(clone).sites(clone.get_model_object("diffusion_model")))
        except ValueError as e:
            raise ValueError(f"video_model (Selective Feature Injection): {e}") from None
        injector = SelectiveFeatureInjection(clone, *sfi_layers_and_gamma(sfi_setting, sfi_layers, sfi_gamma, n_layers))
        video_stage = Stage(clone, video.positive, video.negative, video.cfg, video.sampler_name, video.scheduler, video.steps)
    inner_image = comfy.samplers.sampler_object(image.sampler_name)
    inner_video = comfy.samplers.sampler_object(video.sampler_name)

    image_latent = bridge.to_image(samples)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise_1 = torch.randn(image_latent.shape, generator=generator, dtype=torch.float32)
    noise_v = torch.randn(samples.shape, generator=generator, dtype=torch.float32)
    noise_3 = torch.randn(image_latent.shape, generator=generator, dtype=torch.float32)
    seeds = [(seed + i) % 0x10000000000000000 for i in range(3)]

    inversion_steps = 0 if injector is None else len(schedule.inversion_sigmas()) - 1
    total = (schedule.image_steps_before + 1 + inversion_steps + schedule.video_steps + int(schedule.video_x0_call)
             + schedule.image_steps_after)
    progress = _Progress(total)

    # 1. T2I down to level t_T2V, then the image model's x0 prediction there.
    zero = torch.zeros(1)
    sigmas_1 = torch.cat([schedule.image_sigmas[schedule.image_start:schedule.handover + 1], zero])
    k = schedule.image_steps_before
    sampler_1 = _program_sampler([("sample", 0, k), ("x0", k)], inner_image)
    progress.use_previewer(image.model)
    x0_image = _run(_guider(image), noise_1, image_latent, sampler_1, sigmas_1, progress, seeds[0])

    # 2. [T2V] block on x0_I.
    video_latent = bridge.to_video(x0_image)
    block = schedule.video_sigmas[schedule.video_start:schedule.video_end + 1]
    tail = [zero] if schedule.video_x0_call else []
    guider_v = _guider(video_stage, injector)
    if injector is None:
        sigmas_v = torch.cat([block] + tail)
        parts = [("sample", 0, schedule.video_steps)]
        noise = noise_v
    else:
        # DDIM inversion from the clean end up to level t_V, then the block from the inverted latent.
        up = schedule.inversion_sigmas()
        n_up = len(up) - 1
        sigmas_v = torch.cat([up, block[1:]] + tail)
        parts = [("invert", 0, n_up), ("sample", n_up, n_up + schedule.video_steps)]
        injector.keep_levels(block)
        noise = torch.zeros_like(noise_v)  # the inverted latent is the start; nothing is added
    if schedule.video_x0_call:
        parts.append(("x0", len(sigmas_v) - 2))
    progress.use_previewer(video.model)
    try:
        x0_video = _run(guider_v, noise, video_latent, _program_sampler(parts, inner_video, guider_v, injector),
                        sigmas_v, progress, seeds[1])
    finally:
        if injector is not None:
            injector.store.clear()

    # 3. Re-noise x0_IV to level t_T2V with the image model's own noise scaling and finish.
    sigmas_3 = schedule.image_sigmas[schedule.handover:]
    progress.use_previewer(image.model)
    final = _run(_guider(image), noise_3, bridge.to_image(x0_video), inner_image, sigmas_3, progress, seeds[2])

    out_samples, frames = bridge.finish(final)
    out = {k: v for k, v in latent.items() if k != "samples"}
    out["samples"] = out_samples
    return out, frames
