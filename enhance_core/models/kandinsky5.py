"""Kandinsky 5 (`comfy/ldm/kandinsky5`, newer ComfyUI only; matches nothing where the running
ComfyUI lacks it).

Video self-attention is `visual_transformer_blocks.i.self_attention` (text enters through
cross-attention); its forward ends with the output projection `out_layer`, before the block's gate
and residual. Tokens (t, h, w) with patch (1, 2, 2), the latent padded to it. The text encoder
blocks' self-attention is not a video layer and is not listed.
"""

from . import AttentionSite, BlockSite, FamilyAdapter, is_instance_of, TokenLayout, patched_tokens


class Kandinsky5Adapter(FamilyAdapter):
    name = "Kandinsky 5 (newer ComfyUI)"

    def matches(self, diffusion_model) -> bool:
        return is_instance_of(diffusion_model, "comfy.ldm.kandinsky5.model", "Kandinsky5")

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"visual_transformer_blocks.{i}.self_attention",
                              output=f"visual_transformer_blocks.{i}.self_attention")
                for i in range(len(diffusion_model.visual_transformer_blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        return [BlockSite(f"visual_transformer_blocks.{i}", attention_input=f"visual_transformer_blocks.{i}.self_attention_norm")
                for i in range(len(diffusion_model.visual_transformer_blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        _, ph, pw = diffusion_model.patch_size
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], ph) * patched_tokens(x.shape[-1], pw))


ADAPTER = Kandinsky5Adapter()
