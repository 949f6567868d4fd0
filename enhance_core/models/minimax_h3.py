"""MiniMax H3 (`comfy/ldm/minimax/model.py`, MiniMaxH3Model; newer ComfyUI only, matches nothing
where the running ComfyUI lacks it).

One packed sequence, sequence-first and without a batch dimension ([rows, hidden]): text, then
keyframe or reference rows, then the target audio, then the target video, always last
(`minimax_payload["layout"].segments`). Each `blocks.i` (DiTBlock) has one self-attention over the
whole sequence: `blocks.i.attn`, whose q/k are normalised and rotated by one fused in-place kernel
(q_norm does not run then), so the layer is armed on `attn.qkv_proj`, which always runs, and closed
by `attn.out_proj`, the output projection before the block's gate and residual; its output is
[rows, hidden].

"The video" is the target video segment only: latent_t frames of (h/2)*(w/2) rows, frame-major.
Keyframe and reference rows are other tokens, like text and audio: they are clean conditions at
their own positions in time, not frames of the video being made, so they are neither grouped into
frames, measured, scaled nor mixed. The model runs one batch element per call (it raises on more):
branch methods run their extra conds as separate calls (`max_batch`).
"""

import inspect

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, is_instance_of, patched_tokens


class MiniMaxH3Adapter(FamilyAdapter):
    name = "MiniMax H3 (newer ComfyUI)"
    # MiniMaxH3Model._forward raises for a batch of more than one. No shared prefix for guidance
    # branches (prefix_blocks): a branch never shares a forward with the cond it copies.
    max_batch = 1

    def matches(self, diffusion_model) -> bool:
        return is_instance_of(diffusion_model, "comfy.ldm.minimax.model", "MiniMaxH3Model")

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"blocks.{i}.attn.qkv_proj", output=f"blocks.{i}.attn.out_proj",
                              disarm=f"blocks.{i}.attn.out_proj", output_seq_first=True)
                for i in range(len(diffusion_model.blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        return [BlockSite(f"blocks.{i}", attention_input=f"blocks.{i}.norm1") for i in range(len(diffusion_model.blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        video = x[0]  # x is [video latent, audio latent]
        pt, ph, pw = diffusion_model.patch_size
        frames, rows, cols = (patched_tokens(n, p) for n, p in zip(video.shape[-3:], (pt, ph, pw)))
        tokens_per_frame = rows * cols
        call = inspect.signature(diffusion_model._forward).bind_partial(x, *args, **kwargs).arguments
        packed = (call.get("minimax_payload") or {}).get("layout")
        if packed is not None and packed.signature[1:] == (frames * pt, rows * ph, cols * pw, x[1].shape[-1]):
            start, stop, _ = next(s for s in packed.segments if s[2] == "video")
            if stop != packed.seq_len or stop - start != frames * tokens_per_frame:
                raise ValueError(f"MiniMax H3: the packed layout puts the target video at rows {start}-{stop} of "
                                 f"{packed.seq_len}; this pack expects it last, {frames} frames of {tokens_per_frame} "
                                 "rows (ComfyUI changed the layout)")
        # The video is the sequence's last frames * tokens_per_frame rows; everything before it
        # (text, keyframes, references, audio) is other tokens.
        return TokenLayout(tokens_per_frame=tokens_per_frame, frames=frames, text_first=True)


ADAPTER = MiniMaxH3Adapter()
