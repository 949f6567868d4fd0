"""Wan 2.1 / 2.2 (t2v, i2v, the 5B TI2V, VACE, camera and other WanModel variants).

Self-attention is `blocks.i.self_attn` (WanSelfAttention): its q projection `q` runs just before
the kernel call, and its forward ends with the output projection `o`, before the block's gate and
residual. No text tokens in self-attention (text enters
through cross-attention). A reference latent, where a variant adds one, is one more frame in front.
Autoregressive Wan (CausalWanModel) shares the backbone and is refused: see `refusal`.
"""

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, is_instance_of, patched_tokens


# Variants whose blocks read nothing sized by the batch beyond the block-replace point's arguments
# (read in comfy/ldm/wan/ of ComfyUI 0.3.75 and 0.33): a shared prefix that runs fewer rows through
# the block is exact there. What they add outside the blocks (VACE hints, S2V's and WanDancer's audio
# injectors, Animate's face features) is added to the whole batch after the block, row by row. Not
# listed, so they run the branches in full: HumoWanModel (blocks read the whole batch's audio
# tokens), WanAnimate2Model (pose keys, values and buffers of the whole batch), CausalWanModel (no
# block-replace points), and any variant not read yet.
SHARED_PREFIX_EXACT = {"WanModel", "VaceWanModel", "CameraWanModel", "WanModel_S2V", "AnimateWanModel",
                       "SCAILWanModel", "SCAIL2WanModel", "WanDancerModel"}


class WanAdapter(FamilyAdapter):
    name = "Wan 2.1 / 2.2"
    prefix_blocks = "double_block"

    def prefix_points(self, diffusion_model):
        if type(diffusion_model).__name__ not in SHARED_PREFIX_EXACT:
            return None
        return super().prefix_points(diffusion_model)

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.wan.model import WanModel
        return isinstance(diffusion_model, WanModel)

    def refusal(self, diffusion_model) -> str | None:
        if is_instance_of(diffusion_model, "comfy.ldm.wan.ar_model", "CausalWanModel"):
            return ("autoregressive Wan (Causal Forcing / Self-Forcing) is sampled a few frames at a time by ComfyUI's "
                    "AR video sampler, each chunk attending to the earlier frames through a KV cache, and its blocks get "
                    "none of ComfyUI's per-call options; every method here needs self-attention over the whole clip "
                    "in one model call. Use a regular Wan 2.1 / 2.2 model")
        return None

    def sites(self, diffusion_model) -> list[AttentionSite]:
        # Children of self_attn: packs that patch self_attn.forward (KJNodes' Enhance-A-Video) stay
        # composable, and the hooks run inside their forward as long as it calls q and o. The arm is
        # the q projection, not the q norm: a norm may be fused into a kernel with the rotary
        # embedding (other families do so in ComfyUI 0.33), and its module then never runs.
        return [AttentionSite(arm=f"blocks.{i}.self_attn.q", output=f"blocks.{i}.self_attn.o",
                              disarm=f"blocks.{i}.self_attn.o")
                for i in range(len(diffusion_model.blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        return [BlockSite(f"blocks.{i}", attention_input=f"blocks.{i}.norm1") for i in range(len(diffusion_model.blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        _, ph, pw = diffusion_model.patch_size
        return TokenLayout(tokens_per_frame=patched_tokens(x.shape[-2], ph) * patched_tokens(x.shape[-1], pw))


ADAPTER = WanAdapter()
