"""Enhance-A-Video (Zhao et al. 2025) on a clone of a ComfyUI video model.

Per selected self-attention layer and model call:
  1. the attention override sees q, k after QK-norm and RoPE, takes the video tokens and computes
     scale = clamp((F + weight) * CFI, 1), one value per batch element (cross_frame_intensity.py);
  2. the layer's output module (attention output after its projection, before the gate and the
     residual) is multiplied by that scale, video tokens only. Where the family normalises that
     output before the gate (Mochi), the norm's result is scaled instead; where the projection is
     shared with the MLP (single-stream blocks), the kernel's output is.

One scale per batch element, where the official code pools one scalar over the batch: ComfyUI
batches cond and uncond or not depending on free memory, and the result must not depend on that.
With one batch element the two are identical.

Strength by length (ours, off by default): with evenly spread temporal attention CFI = 1/F, so the
paper's scale is 1 + weight / F: one weight lifts it 2.3 times as much on 9 latent frames (33 video
frames of Wan) as on 21 (81 frames). Given reference_latent_frames R > 0, the weight used at F
latent frames is weight * F / R, so the scale is clamp(F * (1 + weight / R) * CFI, 1): 1 + weight / R
for evenly spread attention at any length, and exactly the paper's scale at F = R.
"""

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

from ..measures.cross_frame_intensity import enhance_scale
from ..models import adapter_for
from ..patching.layer_lists import parse_layer_list
from ..patching.layer_routing import SelfAttentionLayers
from ..patching.sigma_window import SigmaWindow

log = logging.getLogger(__name__)


def _scale_video_(tokens: torch.Tensor, scale: torch.Tensor, span: tuple[int, int, int], seq_first: bool = False) -> torch.Tensor:
    """Multiply the video tokens of tokens [B, L, ...] ([L, B, ...] when seq_first, or [L, C] from a
    model that runs one batch element without its dimension) by scale [B], in place: the product is
    computed in float32 and stored in the tokens' dtype, so a bf16 model gets the exact scale
    without a float32 copy of the output.

    span = (start, stop, seq_len) of the video tokens in the attention call's sequence: a tensor of
    seq_len tokens (joint attention output) is scaled on [start, stop), one of stop - start tokens
    (video only) everywhere."""
    if seq_first:
        view = tokens.unsqueeze(0) if tokens.ndim == 2 else tokens.transpose(0, 1)
    else:
        view = tokens
    start, stop, seq_len = span
    if view.shape[1] == seq_len:
        view = view[:, start:stop]
    elif view.shape[1] != stop - start:
        raise RuntimeError(f"Enhance-A-Video: an attention output of {view.shape[1]} tokens matches neither the "
                           f"{seq_len}-token sequence nor its {stop - start} video tokens; the model's layout "
                           "is not what its adapter expects")
    view.mul_(scale.view([-1] + [1] * (view.ndim - 1)))
    return tokens


class _ScaleNormResult(TorchFunctionMode):
    """While active, scales the result of torch.nn.functional.rms_norm applied to one given tensor
    (identified by identity, so the block's other norms are untouched). This reaches a point inside a
    block's forward that no module boundary exposes: Mochi normalises the attention output there."""

    def __init__(self, pending: dict):
        super().__init__()
        self.pending = pending

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        target = self.pending.get("normalized")
        if func is torch.nn.functional.rms_norm and target is not None and args and args[0] is target:
            del self.pending["normalized"]
            out = _scale_video_(out, self.pending.pop("scale"), self.pending.pop("span"))
        return out


def weight_for_length(weight: float, frames: int, reference_latent_frames: int) -> float:
    """The weight used at `frames` latent frames: `weight` itself when reference_latent_frames is 0
    (the paper's rule), else weight * frames / reference_latent_frames (see the module docstring).
    The ratio is taken first, so frames == reference_latent_frames gives `weight` bit for bit."""
    if reference_latent_frames == 0:
        return weight
    return weight * (frames / reference_latent_frames)


def apply_enhance_a_video(model, weight: float, start_percent: float = 0.0, end_percent: float = 1.0, layers: str = "all",
                          reference_latent_frames: int = 0):
    """A clone of `model` with Enhance-A-Video on the chosen self-attention layers.

    weight 0 returns a plain clone (bit-identical sampling). reference_latent_frames > 0: `weight` is
    the strength at that many latent frames, scaled with the frame count (weight_for_length)."""
    if weight != weight:
        raise ValueError(f"weight: {weight} is not a number; use 0 (off) to 100")
    if weight < 0:
        raise ValueError(f"weight: {weight} is negative; use 0 (off) or more")
    if isinstance(reference_latent_frames, bool) or not isinstance(reference_latent_frames, int) \
            or reference_latent_frames < 0:
        raise ValueError(f"reference_latent_frames: {reference_latent_frames!r} is not a whole number of latent frames; "
                         "use 0 (off: the paper's weight) or more")
    adapter = adapter_for(model)
    window = SigmaWindow(model, start_percent, end_percent)
    m = model.clone()
    window.follow(m)
    if weight == 0:
        parse_layer_list(layers, len(adapter.sites(model.get_model_object("diffusion_model"))), "layers")
        return m
    hooks = SelfAttentionLayers(m, adapter, "freevideo_enhance_a_video", "Enhance-A-Video")
    selected = parse_layer_list(layers, len(hooks.sites), "layers")
    # The scale (and video span) waiting for the current layer's output module, per thread: model
    # calls of multi-GPU work units run concurrently.
    state = threading.local()

    def pending() -> dict:
        if not hasattr(state, "pending"):
            state.pending = {}
        return state.pending
    logged = set()

    def attention(call):
        pending().clear()  # nothing from an earlier, interrupted call may reach this layer's output
        if not window.contains(call.options):
            return call.run()
        # Not a square call (a layer that splits its queries into several kernel calls): nothing
        # to measure here.
        video = call.video
        if video is None or video.frames < 2:
            if video is not None and "single" not in logged:
                log.info("Enhance-A-Video: one latent frame, nothing to enhance (no-op)")
                logged.add("single")
            return call.run()
        scale = enhance_scale(call.tokens_first(call.q)[:, video.start:video.stop],
                              call.tokens_first(call.k)[:, video.start:video.stop], video.frames,
                              weight_for_length(weight, video.frames, reference_latent_frames))
        out = call.run()
        span = (video.start, video.stop, call.seq_len)
        if hooks.sites[call.layer].output is None:
            # The projection after this kernel also takes other features: scale the attention
            # output itself (as the official code does in single-stream blocks).
            _scale_video_(call.output_tokens(out), scale, span)
        else:
            pending().update(scale=scale, span=span)
        return out

    def scale_output(seq_first):
        def around(call, *args, **kwargs):
            out = call(*args, **kwargs)
            waiting = pending()
            if "scale" not in waiting:
                return out
            return _scale_video_(out, waiting.pop("scale"), waiting.pop("span"), seq_first)
        return around

    def mark_output(call, *args, **kwargs):
        # The output is normalised later in the block: remember which tensor that norm will get.
        out = call(*args, **kwargs)
        waiting = pending()
        if "scale" in waiting:
            waiting["normalized"] = out
        return out

    def scale_after_norm(call, *args, **kwargs):
        waiting = pending()
        with _ScaleNormResult(waiting):
            out = call(*args, **kwargs)
        if "scale" in waiting:
            waiting.clear()
            raise RuntimeError("Enhance-A-Video: this block no longer applies rms_norm to its attention output "
                               "where the model adapter expects it (ComfyUI changed the block); the scale was not applied")
        return out

    hooks.route(selected, attention)
    for layer in selected:
        site = hooks.sites[layer]
        if site.output is None:
            continue
        # Where output is the arm module itself, this stacks outside the arming hook.
        if site.normalized_in is None:
            hooks.hook_module(site.output, scale_output(site.output_seq_first))
        else:
            hooks.hook_module(site.output, mark_output)
            hooks.hook_module(site.normalized_in, scale_after_norm)
    return m
