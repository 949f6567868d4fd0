"""Enhance-A-Video (Zhao et al. 2025) on a clone of a ComfyUI video model.

Per selected self-attention layer and model call:
  1. the attention override sees q, k after QK-norm and RoPE, takes the video tokens and computes
     scale = clamp((F + weight) * CFI, 1), one value per batch element (cross_frame_intensity.py);
  2. the layer's output module (attention output after its projection, before the gate and the
     residual) is multiplied by that scale, video tokens only.

One scale per batch element, where the official code pools one scalar over the batch: ComfyUI
batches cond and uncond or not depending on free memory, and the result must not depend on that.
With one batch element the two are identical.
"""

import logging

import torch

from .attention_hooks import SigmaWindow, add_attention_override, hooked_copy, parse_layer_list, tokens_view
from .cross_frame_intensity import enhance_scale
from .models import adapter_for

WRAPPER_KEY = "freevideo_enhance_a_video"
log = logging.getLogger(__name__)


class _CallState:
    """What one model call of the patched clone has learned so far (model calls run one at a time)."""

    def __init__(self):
        self.layout = None   # TokenLayout of the running call
        self.armed = None    # site index whose self-attention kernel call comes next
        self.scale = None    # scale waiting for the armed site's output module
        self.single_frame_logged = False


def _scale_tokens_(tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, C] *= scale [B], in place: the product is computed in float32 and stored in the
    tokens' dtype, so a bf16 model gets the exact scale without a float32 copy of the output."""
    return tokens.mul_(scale.view(-1, 1, 1))


def apply_enhance_a_video(model, weight: float, start_percent: float = 0.0, end_percent: float = 1.0, layers: str = "all"):
    """A clone of `model` with Enhance-A-Video on the chosen self-attention layers.

    weight 0 or an empty selection returns a plain clone (bit-identical sampling)."""
    if weight < 0:
        raise ValueError(f"weight: {weight} is negative; use 0 (off) or more")
    adapter = adapter_for(model)
    window = SigmaWindow(model, start_percent, end_percent)
    sites = adapter.sites(model.get_model_object("diffusion_model"))
    selected = parse_layer_list(layers, len(sites), "layers")
    m = model.clone()
    if weight == 0:
        return m
    state = _CallState()

    def model_call(executor, x, *args, **kwargs):
        state.layout = adapter.layout(executor.class_obj, x, args, kwargs)
        state.armed = state.scale = None
        try:
            return executor(x, *args, **kwargs)
        finally:
            state.layout = state.armed = state.scale = None

    def attention(call_next, q, k, v, heads, **kwargs):
        site, state.armed = state.armed, None
        if site is None or state.layout is None or not window.contains(kwargs.get("transformer_options") or {}):
            return call_next(q, k, v, heads, **kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        span = state.layout.video_span(q.shape[2] if skip_reshape else q.shape[1])
        if span is None or span[1] < 2:
            if span is not None and not state.single_frame_logged:
                log.info("Enhance-A-Video: one latent frame, nothing to enhance (no-op)")
                state.single_frame_logged = True
            return call_next(q, k, v, heads, **kwargs)
        start, frames = span
        stop = start + frames * state.layout.tokens_per_frame
        qv = tokens_view(q, heads, skip_reshape)[:, start:stop]
        kv = tokens_view(k, heads, skip_reshape)[:, start:stop]
        scale = enhance_scale(qv, kv, frames, weight)
        out = call_next(q, k, v, heads, **kwargs)
        if sites[site].output is None:
            # The projection after this kernel also takes other features: scale the attention
            # output itself (as the official code does in single-stream blocks).
            video = out.transpose(1, 2) if kwargs.get("skip_output_reshape", False) else out
            _scale_tokens_(video[:, start:stop], scale)
        else:
            state.scale = scale
        return out

    def arm(index):
        def around(call, *args, **kwargs):
            state.armed = index
            return call(*args, **kwargs)
        return around

    def scale_output(call, *args, **kwargs):
        out = call(*args, **kwargs)
        scale, state.scale = state.scale, None
        return out if scale is None else _scale_tokens_(out, scale)

    m.add_wrapper_with_key(adapter.wrapper_type, WRAPPER_KEY, model_call)
    add_attention_override(m, attention)
    for index in selected:
        site = sites[index]
        _patch(m, site.arm, arm(index))
        if site.output is not None:
            # Where output is arm itself this stacks outside the arming hook.
            _patch(m, site.output, scale_output)
    return m


def _patch(m, path, around):
    key = f"diffusion_model.{path}"
    m.add_object_patch(key, hooked_copy(m.get_model_object(key), around))
