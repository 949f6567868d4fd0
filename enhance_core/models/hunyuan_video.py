"""HunyuanVideo 1.0 and 1.5 (`comfy/ldm/hunyuan_video`, built from Flux's double and single stream
blocks).

Layers are numbered double-stream blocks first, then single-stream blocks. Both attend jointly over
video and text tokens; only video tokens enter the cross-frame intensity and get scaled.
- Double block: the image stream's attention output after its projection is `img_attn.proj`
  (before the gate and residual); the text stream has its own projection and is left alone.
- Single block: `linear2` projects the attention output and the MLP together, so the kernel's
  output is scaled (video tokens), as the official code does.
Token order changed between ComfyUI versions: up to 0.3.x video tokens come first in both block
kinds; newer ComfyUI puts text first (the same change removed the double blocks'
`flipped_img_txt` flag, which is what tells the two apart). A reference latent ("custom" image
guidance) is prepended to the video tokens as more frames.
"""

import inspect

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, patched_tokens


def _video_tokens_first(diffusion_model) -> bool:
    if len(diffusion_model.double_blocks):
        return bool(getattr(diffusion_model.double_blocks[0], "flipped_img_txt", False))
    from comfy.ldm.flux.layers import DoubleStreamBlock
    return "flipped_img_txt" in inspect.signature(DoubleStreamBlock.__init__).parameters


class HunyuanVideoAdapter(FamilyAdapter):
    name = "HunyuanVideo 1.0 / 1.5"

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.hunyuan_video.model import HunyuanVideo
        # Hunyuan Image 2.1 shares the class with 2-D patches: an image model.
        return isinstance(diffusion_model, HunyuanVideo) and len(diffusion_model.patch_size) == 3

    def sites(self, diffusion_model) -> list[AttentionSite]:
        double = [AttentionSite(arm=f"double_blocks.{i}", output=f"double_blocks.{i}.img_attn.proj")
                  for i in range(len(diffusion_model.double_blocks))]
        single = [AttentionSite(arm=f"single_blocks.{i}", output=None)
                  for i in range(len(diffusion_model.single_blocks))]
        return double + single

    def prefix_points(self, diffusion_model) -> list[tuple[str, int]]:
        # Layers 0..D-1 are the double blocks, then the single blocks, each with its replace point.
        return ([("double_block", i) for i in range(len(diffusion_model.double_blocks))]
                + [("single_block", i) for i in range(len(diffusion_model.single_blocks))])

    def blocks(self, diffusion_model) -> list[BlockSite]:
        # A single-stream block's pre_norm feeds linear1, which forms q, k, v and the MLP input together.
        return ([BlockSite(f"double_blocks.{i}", f"double_blocks.{i}.img_norm1") for i in range(len(diffusion_model.double_blocks))]
                + [BlockSite(f"single_blocks.{i}", f"single_blocks.{i}.pre_norm") for i in range(len(diffusion_model.single_blocks))])

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        pt, ph, pw = diffusion_model.patch_size
        frames = patched_tokens(x.shape[-3], pt)
        call = inspect.signature(diffusion_model._forward).bind_partial(x, *args, **kwargs).arguments
        ref = call.get("ref_latent")
        if ref is not None:
            if ref.shape[-2:] == x.shape[-2:]:
                frames += patched_tokens(ref.shape[-3], pt)
            else:
                frames = 0  # not whole frames: no temporal grouping to measure (no-op)
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], ph) * patched_tokens(x.shape[-1], pw),
                           frames=frames, text_first=not _video_tokens_first(diffusion_model))


ADAPTER = HunyuanVideoAdapter()
