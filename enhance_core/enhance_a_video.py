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

from .attention_hooks import SelfAttentionLayers, SigmaWindow, parse_layer_list, tokens_view
from .cross_frame_intensity import enhance_scale
from .models import adapter_for

log = logging.getLogger(__name__)


def _scale_tokens_(tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, C] *= scale [B], in place: the product is computed in float32 and stored in the
    tokens' dtype, so a bf16 model gets the exact scale without a float32 copy of the output."""
    return tokens.mul_(scale.view(-1, 1, 1))


def apply_enhance_a_video(model, weight: float, start_percent: float = 0.0, end_percent: float = 1.0, layers: str = "all"):
    """A clone of `model` with Enhance-A-Video on the chosen self-attention layers.

    weight 0 returns a plain clone (bit-identical sampling)."""
    if weight < 0:
        raise ValueError(f"weight: {weight} is negative; use 0 (off) or more")
    adapter = adapter_for(model)
    window = SigmaWindow(model, start_percent, end_percent)
    m = model.clone()
    if weight == 0:
        parse_layer_list(layers, len(adapter.sites(model.get_model_object("diffusion_model"))), "layers")
        return m
    hooks = SelfAttentionLayers(m, adapter, "freevideo_enhance_a_video")
    selected = parse_layer_list(layers, len(hooks.sites), "layers")
    pending = {}  # the scale waiting for the current layer's output module
    logged = set()

    def attention(layer, layout, call_next, q, k, v, heads, **kwargs):
        if not window.contains(kwargs.get("transformer_options") or {}):
            return call_next(q, k, v, heads, **kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        span = layout.video_span(q.shape[2] if skip_reshape else q.shape[1])
        if span is None or span[1] < 2:
            if span is not None and "single" not in logged:
                log.info("Enhance-A-Video: one latent frame, nothing to enhance (no-op)")
                logged.add("single")
            return call_next(q, k, v, heads, **kwargs)
        start, frames = span
        stop = start + frames * layout.tokens_per_frame
        scale = enhance_scale(tokens_view(q, heads, skip_reshape)[:, start:stop],
                              tokens_view(k, heads, skip_reshape)[:, start:stop], frames, weight)
        out = call_next(q, k, v, heads, **kwargs)
        if hooks.sites[layer].output is None:
            # The projection after this kernel also takes other features: scale the attention
            # output itself (as the official code does in single-stream blocks).
            video = out.transpose(1, 2) if kwargs.get("skip_output_reshape", False) else out
            _scale_tokens_(video[:, start:stop], scale)
        else:
            pending["scale"] = scale
        return out

    def scale_output(call, *args, **kwargs):
        out = call(*args, **kwargs)
        scale = pending.pop("scale", None)
        return out if scale is None else _scale_tokens_(out, scale)

    hooks.route(selected, attention)
    for layer in selected:
        if hooks.sites[layer].output is not None:
            # Where output is the arm module itself, this stacks outside the arming hook.
            hooks.hook_module(hooks.sites[layer].output, scale_output)
    return m
