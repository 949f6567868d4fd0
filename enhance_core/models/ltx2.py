"""LTX-2 (`comfy/ldm/lightricks/av_model.py`, LTXAVModel: audio and video in one model).

Each block holds a video stream and an audio stream: video self-attention `attn1`, audio
self-attention `audio_attn1`, text cross-attention for each, and audio<->video cross-attention
between them. The methods act on the video self-attention only, as on LTX-Video (the papers study
video): `transformer_blocks.i.attn1`, whose forward ends with its output projection `to_out`.
Every other kernel call of the block, audio_attn1 and the cross-modal ones included, goes on
untouched. The model receives [video, audio] latents; the token layout is the video latent's
(patch 1, frame-major; guide frames are more video frames).

A block's hidden state is the (video, audio) pair: its first argument and its output. ComfyUI's
("double_block", i) replace points hand the blocks timestep embeddings in a compressed per-frame
form that is not a batch-first tensor, so guidance branches cannot share the blocks before their
first changed layer here: no prefix points, branches run every block.
"""

from . import TokenLayout, is_instance_of, patched_tokens
from .ltxv import LTXVAdapter


class LTX2Adapter(LTXVAdapter):
    name = "LTX-2"
    prefix_blocks = None

    def matches(self, diffusion_model) -> bool:
        return is_instance_of(diffusion_model, "comfy.ldm.lightricks.av_model", "LTXAVModel")

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        # [video, audio] (a list, or ComfyUI's NestedTensor); a plain tensor is a video alone.
        video = x.unbind()[0] if getattr(x, "is_nested", False) else x[0] if isinstance(x, (list, tuple)) else x
        _, ph, pw = diffusion_model.patchifier.patch_size
        return TokenLayout(tokens_per_frame=patched_tokens(video.shape[-2], ph) * patched_tokens(video.shape[-1], pw))


ADAPTER = LTX2Adapter()
