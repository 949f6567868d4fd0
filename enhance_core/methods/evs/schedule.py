"""EVS's schedule: Algorithm 1 placed on the image and video models' own sigma schedules, and the
paper's settings of selective feature injection."""

import math
from dataclasses import dataclass

import torch

import comfy.samplers


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
class EVSSchedule:
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


def evs_schedule(image: Stage, video: Stage, strength: float, t_T2V: int, t_V: int, n_V: int) -> EVSSchedule:
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
    return EVSSchedule(image_sigmas=image_sigmas, image_start=image.steps - t1, handover=image.steps - t_T2V,
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
