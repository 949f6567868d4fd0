"""LTX-Video (`comfy/ldm/lightricks`).

Self-attention is `transformer_blocks.i.attn1`; its forward ends with the output projection
`to_out`, before the block's gate and residual. Patch size 1: one token per latent pixel, frame-major.
Guide frames (LTXVAddGuide appends their latents along time) are more video frames. LTX-2's
audio-video model subclasses LTXVModel with another latent layout: ltx2.py is its adapter.
"""

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, is_instance_of, patched_tokens


class LTXVAdapter(FamilyAdapter):
    name = "LTX-Video"
    # transformer_blocks.i (ComfyUI's ("double_block", i) replace point) holds self-attention layer i.
    prefix_blocks = "double_block"

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.lightricks.model import LTXVModel
        # LTX-2's audio-video model subclasses LTXVModel: ltx2.py's adapter.
        return isinstance(diffusion_model, LTXVModel) and \
            not is_instance_of(diffusion_model, "comfy.ldm.lightricks.av_model", "LTXAVModel")

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"transformer_blocks.{i}.attn1", output=f"transformer_blocks.{i}.attn1")
                for i in range(len(diffusion_model.transformer_blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        # attn1's input is an RMS norm function of the hidden state (fused with the modulation in newer ComfyUI).
        return [BlockSite(f"transformer_blocks.{i}", attention_input=None) for i in range(len(diffusion_model.transformer_blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        _, ph, pw = diffusion_model.patchifier.patch_size
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], ph) * patched_tokens(x.shape[-1], pw))


ADAPTER = LTXVAdapter()
