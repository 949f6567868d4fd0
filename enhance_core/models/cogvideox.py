"""CogVideoX 1.0 / 1.5 (`comfy/ldm/cogvideo`, newer ComfyUI only; matches nothing where the running
ComfyUI lacks it).

Each block attends jointly over text then video tokens; the kernel call is in the block's own
forward and the shared output projection `attn_out` (before the gates and residuals) covers both:
only its video tokens are scaled. Patch (patch_size_t or 1, 2, 2); the latent is padded to it.
"""

from . import AttentionSite, FamilyAdapter, TokenLayout, patched_tokens


def _model_class():
    try:
        from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
    except ImportError:
        return None
    return CogVideoXTransformer3DModel


class CogVideoXAdapter(FamilyAdapter):
    name = "CogVideoX (newer ComfyUI)"

    def matches(self, diffusion_model) -> bool:
        cls = _model_class()
        return cls is not None and isinstance(diffusion_model, cls)

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"blocks.{i}", output=f"blocks.{i}.attn_out")
                for i in range(len(diffusion_model.blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        p = diffusion_model.patch_size
        pt = diffusion_model.patch_size_t or 1
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], p) * patched_tokens(x.shape[-1], p),
                           frames=patched_tokens(x.shape[-3], pt), text_first=True)


ADAPTER = CogVideoXAdapter()
