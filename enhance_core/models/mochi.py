"""Mochi (`comfy/ldm/genmo`, AsymmDiTJoint).

Joint attention in `blocks.i.attn`: video tokens first, then the text tokens (cropped to the
prompt's length). The video stream's attention output after its projection is `attn.proj_x`, but
the block then applies rms_norm to it before the tanh gate and the residual (a sandwich norm), which
would cancel a plain scale: the scale applies to that norm's result, inside the block's forward.
Mochi's diffusion model has no DIFFUSION_MODEL wrapper, so the layout comes from the APPLY_MODEL
wrapper (the model_base model and the latent).
"""

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, patched_tokens


class MochiAdapter(FamilyAdapter):
    name = "Mochi"
    wrapper_type = "apply_model"
    # blocks.i (ComfyUI's ("double_block", i) replace point, video and text streams) holds layer i.
    prefix_blocks = "double_block"

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmDiTJoint
        return isinstance(diffusion_model, AsymmDiTJoint)

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"blocks.{i}.attn", output=f"blocks.{i}.attn.proj_x", normalized_in=f"blocks.{i}")
                for i in range(len(diffusion_model.blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        # The joint attention module takes the raw video stream and normalises it itself.
        return [BlockSite(f"blocks.{i}", attention_input=f"blocks.{i}.attn") for i in range(len(diffusion_model.blocks))]

    def layout(self, model, x, args, kwargs) -> TokenLayout:
        p = model.diffusion_model.patch_size
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], p) * patched_tokens(x.shape[-1], p),
                           frames=x.shape[-3])


ADAPTER = MochiAdapter()
