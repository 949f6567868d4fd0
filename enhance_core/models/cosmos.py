"""Cosmos-Predict2 (`comfy/ldm/cosmos/predict2.py`, MiniTrainDIT) and Cosmos 1.0
(`comfy/ldm/cosmos/model.py`, GeneralDIT).

Both: video self-attention only (text through cross-attention), tokens in (t, h, w) order, patch
(1, 2, 2). The attention module's forward ends with its output projection, before the block's gate
and residual.
- Predict2: `blocks.i.self_attn`.
- Cosmos 1.0: each `blocks.block{i}` holds building blocks by its config ("FA-CA-MLP"); the
  full-attention one's `block.attn` is the self-attention. It works sequence-first: its output is
  [tokens, batch, channels].
"""

from . import AttentionSite, BlockSite, FamilyAdapter, TokenLayout, is_instance_of, patched_tokens


def _spatial_tokens(patch_spatial, x) -> int:
    ph, pw = (patch_spatial, patch_spatial) if isinstance(patch_spatial, int) else tuple(patch_spatial)[-2:]
    return patched_tokens(x.shape[-2], ph) * patched_tokens(x.shape[-1], pw)


class CosmosPredict2Adapter(FamilyAdapter):
    name = "Cosmos-Predict2"

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.cosmos.predict2 import MiniTrainDIT
        return isinstance(diffusion_model, MiniTrainDIT)

    def refusal(self, diffusion_model) -> str | None:
        # Anima (comfy/ldm/anima) subclasses the backbone with a text adapter: an image model.
        if is_instance_of(diffusion_model, "comfy.ldm.anima.model", "Anima"):
            return ("it is an image model (one picture per latent, no frames), and the methods here act across the "
                    "frames of a video. Use a Cosmos-Predict2 video model")
        return None

    def sites(self, diffusion_model) -> list[AttentionSite]:
        return [AttentionSite(arm=f"blocks.{i}.self_attn", output=f"blocks.{i}.self_attn")
                for i in range(len(diffusion_model.blocks))]

    def blocks(self, diffusion_model) -> list[BlockSite]:
        return [BlockSite(f"blocks.{i}", attention_input=f"blocks.{i}.layer_norm_self_attn") for i in range(len(diffusion_model.blocks))]

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        return TokenLayout(tokens_per_frame=_spatial_tokens(diffusion_model.patch_spatial, x))


class Cosmos1Adapter(FamilyAdapter):
    name = "Cosmos 1.0"

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.cosmos.model import GeneralDIT
        return isinstance(diffusion_model, GeneralDIT)

    def sites(self, diffusion_model) -> list[AttentionSite]:
        sites = []
        for name, block in diffusion_model.blocks.items():
            for j, part in enumerate(block.blocks):
                if part.block_type in ("full_attn", "fa"):
                    path = f"blocks.{name}.blocks.{j}.block.attn"
                    sites.append(AttentionSite(arm=path, output=path, output_seq_first=True))
        return sites

    def blocks(self, diffusion_model) -> list[BlockSite]:
        # Each "blockN" holds its building blocks in config order; the full-attention one's norm_state
        # forms the self-attention input (sequence-first [t, h, w, batch, channels] states).
        found = []
        for name, block in diffusion_model.blocks.items():
            parts = [j for j, part in enumerate(block.blocks) if part.block_type in ("full_attn", "fa")]
            if parts:
                found.append(BlockSite(f"blocks.{name}", attention_input=f"blocks.{name}.blocks.{parts[0]}.norm_state"))
        return found

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        return TokenLayout(tokens_per_frame=_spatial_tokens(diffusion_model.patch_spatial, x))


PREDICT2_ADAPTER = CosmosPredict2Adapter()
COSMOS1_ADAPTER = Cosmos1Adapter()
