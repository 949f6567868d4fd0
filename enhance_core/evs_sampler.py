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
import math
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from .attention_hooks import SelfAttentionLayers, parse_layer_list
from .latent_bridge import make_bridge
from .models import adapter_for

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One model with its conditioning and sampling settings."""

    model: object
    positive: list
    negative: list
    cfg: float
    sampler_name: str
    scheduler: str
    steps: int


@dataclass(frozen=True)
class Plan:
    """Algorithm 1 on two concrete sigma schedules (indices into the full schedules)."""

    image_sigmas: torch.Tensor  # full image schedule, steps + 1 levels
    image_start: int            # level t1
    handover: int               # level t_T2V
    video_sigmas: torch.Tensor  # full video schedule
    video_start: int            # level t_V
    video_end: int              # level t_V - n_V

    @property
    def image_steps_before(self) -> int:
        return self.handover - self.image_start

    @property
    def image_steps_after(self) -> int:
        return len(self.image_sigmas) - 1 - self.handover

    @property
    def video_steps(self) -> int:
        return self.video_end - self.video_start

    @property
    def video_x0_call(self) -> bool:
        return float(self.video_sigmas[self.video_end]) > 0

    def inversion_sigmas(self) -> torch.Tensor:
        """Levels of the DDIM inversion (SFI): from the clean end up to level t_V."""
        up = self.video_sigmas[self.video_start:].flip(0)
        if float(up[0]) > 0:
            up = torch.cat([torch.zeros(1), up])
        return up


def full_schedule(stage: Stage, input_name: str) -> torch.Tensor:
    """The schedule ComfyUI's KSampler uses for this model, sampler and scheduler (all levels)."""
    if stage.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"{input_name}_sampler: unknown sampler '{stage.sampler_name}'")
    if stage.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"{input_name}_scheduler: unknown scheduler '{stage.scheduler}'")
    if stage.steps < 1:
        raise ValueError(f"{input_name}_steps: {stage.steps}; use 1 or more")
    ksampler = comfy.samplers.KSampler(stage.model, steps=stage.steps, device="cpu", sampler=stage.sampler_name,
                                       scheduler=stage.scheduler, denoise=1.0)
    return ksampler.sigmas.float().cpu()


def image_run_steps(strength: float, steps: int) -> int:
    """t1: the image steps SDEdit runs, strength x steps rounded half up (paper: 0.4 x 50 = 20)."""
    return math.floor(strength * steps + 0.5)


def plan_evs(image: Stage, video: Stage, strength: float, t_T2V: int, t_V: int, n_V: int) -> Plan:
    """Check the schedule settings and place them on both schedules; raises ValueError naming the input."""
    image_sigmas = full_schedule(image, "image")
    video_sigmas = full_schedule(video, "video")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: {strength}; use a value in (0, 1] (paper: 0.4 of 50 steps)")
    t1 = image_run_steps(strength, image.steps)
    if t1 < 1:
        raise ValueError(f"strength: {strength} of {image.steps} image steps runs no image step; "
                         f"use at least {1.0 / image.steps:.3f}")
    if not 1 <= t_T2V <= t1:
        raise ValueError(f"t_T2V: {t_T2V} is outside the image run; with image_steps {image.steps} and strength "
                         f"{strength} the image run covers steps {t1}..1, so use 1-{t1}")
    if not 1 <= t_V <= video.steps:
        raise ValueError(f"t_V: {t_V} is outside the video schedule of {video.steps} steps; use 1-{video.steps}")
    if not 1 <= n_V <= t_V:
        raise ValueError(f"n_V: {n_V} video steps from t_V {t_V} run past the end of the video schedule; use 1-{t_V}")
    return Plan(image_sigmas=image_sigmas, image_start=image.steps - t1, handover=image.steps - t_T2V,
                video_sigmas=video_sigmas, video_start=video.steps - t_V, video_end=video.steps - t_V + n_V)


# The paper's two balance points (Fig. 8, U-Net layers): deeper layers with gamma 0.8, or shallower
# layers with gamma 0.5. On a DiT, which has no encoder/decoder depth, "deeper" is our reading as the
# second half of the self-attention layers and "shallower" as the first half.
SFI_SETTINGS = ("deeper layers, gamma 0.8", "shallower layers, gamma 0.5", "custom (sfi_layers, sfi_gamma)")


def sfi_layers_and_gamma(setting: str, layers: str, gamma: float, n_layers: int) -> tuple[str, float]:
    """The layer list and gamma of an SFI setting."""
    if setting == SFI_SETTINGS[0]:
        return f"{n_layers // 2}-{n_layers - 1}", 0.8
    if setting == SFI_SETTINGS[1]:
        return f"0-{max(n_layers // 2 - 1, 0)}", 0.5
    if setting == SFI_SETTINGS[2]:
        return layers, gamma
    raise ValueError(f"sfi_setting: '{setting}'; use one of: {'; '.join(SFI_SETTINGS)}")


def _token_axis(kwargs) -> int:
    return 2 if kwargs.get("skip_reshape", False) else 1


class SelectiveFeatureInjection:
    """Records Q, K, V of chosen self-attention layers of the video model during the DDIM inversion,
    and in the [T2V] steps replaces them: Attn(gamma*Q_inv + (1-gamma)*Q, K_inv, V_inv) (Eq. 11).

    Video tokens only: in joint-attention families (HunyuanVideo, Mochi, CogVideoX) the text tokens of
    every branch keep their own Q, K, V. The inversion runs with the positive prompt; injecting its
    text keys and values into the unconditional branch would pull that branch towards the positive
    prompt (wrong CFG), and the paper's U-Net layers hold video tokens only.

    Features are matched by noise level: a denoising call uses those the inversion recorded at the
    nearest level (the same level for first-order samplers). Only the levels the block evaluates are
    kept. Memory: layers x n_V x 3 tensors of one conditional batch of video tokens.
    """

    def __init__(self, clone, layers: str, gamma: float):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"sfi_gamma: {gamma}; use a value in [0, 1]")
        try:
            adapter = adapter_for(clone)
        except ValueError as e:
            raise ValueError(f"video_model (Selective Feature Injection): {e}") from None
        self.hooks = SelfAttentionLayers(clone, adapter, "freevideo_evs_sfi", "EVS feature injection")
        self.layers = parse_layer_list(layers, len(self.hooks.sites), "sfi_layers")
        self.gamma = gamma
        self.mode = None  # None, "record" or "inject"
        self.sigma = None
        self.levels = []
        self.store = {}
        self._warned = set()
        self.hooks.route(self.layers, self._attention)

    def keep_levels(self, sigmas) -> None:
        self.levels = [float(s) for s in sigmas if float(s) > 0]

    def _level(self, exact: bool):
        if self.sigma is None or not self.levels:
            return None
        best = min(range(len(self.levels)), key=lambda i: abs(self.levels[i] - self.sigma))
        if exact and abs(self.levels[best] - self.sigma) > 1e-6 * max(1.0, self.sigma):
            return None
        return best

    def _warn(self, key, message, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _attention(self, layer, layout, call_next, q, k, v, heads, **kwargs):
        if self.mode is None:
            return call_next(q, k, v, heads, **kwargs)
        axis = _token_axis(kwargs)
        span = layout.video_span(q.shape[axis])
        if span is None or k.shape[axis] != q.shape[axis]:
            self._warn("layout", "EVS SFI: self-attention layer %d has no whole video in this kernel call; not injected there", layer)
            return call_next(q, k, v, heads, **kwargs)
        start, stop = span[0], span[0] + span[1] * layout.tokens_per_frame
        if self.mode == "record":
            level = self._level(exact=True)
            if level is not None:
                self.store[(level, layer)] = tuple(t.narrow(axis, start, stop - start).detach().clone() for t in (q, k, v))
            return call_next(q, k, v, heads, **kwargs)
        saved = self.store.get((self._level(exact=False), layer))
        if saved is None:
            return call_next(q, k, v, heads, **kwargs)
        q_inv, k_inv, v_inv = saved
        video = q.narrow(axis, start, stop - start)
        reps = q.shape[0] // q_inv.shape[0] if q_inv.shape[0] else 0
        if reps < 1 or q.shape[0] != reps * q_inv.shape[0] or video.shape[1:] != q_inv.shape[1:]:
            self._warn("shape", "EVS SFI: the video tokens of layer %d differ from the inversion's (%s vs %s); not injected there",
                       layer, tuple(video.shape), tuple(q_inv.shape))
            return call_next(q, k, v, heads, **kwargs)
        # cond and uncond run as one batch or one at a time: tile the (conditional) record.
        tile = lambda t: t.repeat(reps, *([1] * (t.ndim - 1))) if reps > 1 else t  # noqa: E731
        q, k, v = q.clone(), k.clone(), v.clone()
        q.narrow(axis, start, stop - start).mul_(1.0 - self.gamma).add_(tile(q_inv).to(q), alpha=self.gamma)
        k.narrow(axis, start, stop - start).copy_(tile(k_inv))
        v.narrow(axis, start, stop - start).copy_(tile(v_inv))
        return call_next(q, k, v, heads, **kwargs)


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


def _input_scale(model_sampling, sigma) -> float:
    """The factor ComfyUI's model sampling scales a latent at level sigma by before the network
    (calculate_input: 1 / sqrt(sigma^2 + sigma_data^2) for epsilon, v and EDM models, 1 / (sigma + 1)
    for Cosmos-Predict2's rectified flow, 1 for flow models)."""
    one = torch.ones(1)
    return float(model_sampling.calculate_input(torch.full((1,), float(sigma)), one))


def ddim_inversion_step(predict, x, sigma, sigma_next, model_sampling):
    """One DDIM inversion step of x from level sigma up to sigma_next; predict(x, level) is the
    model's clean-latent prediction through ComfyUI's model sampling. Returns (x at sigma_next, the
    prediction).

    DDIM inversion (as diffusers' DDIMInverseScheduler): the network gets the current latent, at its
    own level, with the timestep of the next level; its noise estimate then moves the latent up with
    the deterministic first-order step. ComfyUI scales a model's input for the level it is called at,
    so the latent is handed over as x * c_in(sigma) / c_in(sigma_next): the network sees
    c_in(sigma) * x, the latent as it is, and the noise estimate is (handed - prediction) /
    sigma_next. (For flow models, c_in is 1: nothing is rescaled.)"""
    handed = x * (_input_scale(model_sampling, sigma) / _input_scale(model_sampling, sigma_next))
    denoised = predict(handed, sigma_next)
    return x + (handed - denoised) * ((sigma_next - sigma) / sigma_next), denoised


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
    plan = plan_evs(image, video, strength, t_T2V, t_V, n_V)
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

    inversion_steps = 0 if injector is None else len(plan.inversion_sigmas()) - 1
    total = (plan.image_steps_before + 1 + inversion_steps + plan.video_steps + int(plan.video_x0_call)
             + plan.image_steps_after)
    progress = _Progress(total)

    # 1. T2I down to level t_T2V, then the image model's x0 prediction there.
    zero = torch.zeros(1)
    sigmas_1 = torch.cat([plan.image_sigmas[plan.image_start:plan.handover + 1], zero])
    k = plan.image_steps_before
    sampler_1 = _program_sampler([("sample", 0, k), ("x0", k)], inner_image)
    progress.use_previewer(image.model)
    x0_image = _run(_guider(image), noise_1, image_latent, sampler_1, sigmas_1, progress, seeds[0])

    # 2. [T2V] block on x0_I.
    video_latent = bridge.to_video(x0_image)
    block = plan.video_sigmas[plan.video_start:plan.video_end + 1]
    tail = [zero] if plan.video_x0_call else []
    guider_v = _guider(video_stage, injector)
    if injector is None:
        sigmas_v = torch.cat([block] + tail)
        parts = [("sample", 0, plan.video_steps)]
        noise = noise_v
    else:
        # DDIM inversion from the clean end up to level t_V, then the block from the inverted latent.
        up = plan.inversion_sigmas()
        n_up = len(up) - 1
        sigmas_v = torch.cat([up, block[1:]] + tail)
        parts = [("invert", 0, n_up), ("sample", n_up, n_up + plan.video_steps)]
        injector.keep_levels(block)
        noise = torch.zeros_like(noise_v)  # the inverted latent is the start; nothing is added
    if plan.video_x0_call:
        parts.append(("x0", len(sigmas_v) - 2))
    progress.use_previewer(video.model)
    try:
        x0_video = _run(guider_v, noise, video_latent, _program_sampler(parts, inner_video, guider_v, injector),
                        sigmas_v, progress, seeds[1])
    finally:
        if injector is not None:
            injector.store.clear()

    # 3. Re-noise x0_IV to level t_T2V with the image model's own noise scaling and finish.
    sigmas_3 = plan.image_sigmas[plan.handover:]
    progress.use_previewer(image.model)
    final = _run(_guider(image), noise_3, bridge.to_image(x0_video), inner_image, sigmas_3, progress, seeds[2])

    out_samples, frames = bridge.finish(final)
    out = {k: v for k, v in latent.items() if k != "samples"}
    out["samples"] = out_samples
    return out, frames
