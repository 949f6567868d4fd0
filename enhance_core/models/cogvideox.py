"""CogVideoX 1.0 / 1.5 (`comfy/ldm/cogvideo`, newer ComfyUI only; matches nothing where the running
ComfyUI lacks it).

Each block attends jointly over text then video tokens; the kernel call is in the block's own
forward and the shared output projection `attn_out` (before the gates and residuals) covers both:
only its video tokens are scaled. Patch (patch_size_t or 1, 2, 2); the latent is padded to it.
"""

from . import AttentionSite, BlockSite, FamilyAdapter, is_instance_of, TokenLayout, patched_tokens


class CogVideoXAdapter(FamilyAdapter):
    name = "CogVideoX (newer ComfyUI)"

    def matches(self, diffusion_model) -> bool:
        return is_instance_of(diffusion_model, "comfy.ldm.cogvideo.model", "CogVideoXTransformer3DModel")

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"blocks.{i}", output=f"blocks.{i}.attn_out")
                for i in range(len(diffusion_model.blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        # norm1(video, text, temb) normalises both streams for the joint attention; video is its first argument.
        return [BlockSite(f"blocks.{i}", attention_input=f"blocks.{i}.norm1") for i in range(len(diffusion_model.blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        p = diffusion_model.patch_size
        pt = diffusion_model.patch_size_t or 1
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], p) * patched_tokens(x.shape[-1], p),
                           frames=patched_tokens(x.shape[-3], pt), text_first=True)


ADAPTER = CogVideoXAdapter()
