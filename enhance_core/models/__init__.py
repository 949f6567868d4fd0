"""One small adapter per native ComfyUI video model family.

An adapter says where each self-attention layer of its family is (which module makes the kernel
call, which module's output is the attention output after its projection) and how the tokens of a
model call are laid out (tokens per latent frame, text tokens and where they sit). The methods
themselves are family-agnostic and index self-attention layers by their position in `sites()`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention layer. Paths are relative to the diffusion model."""

    # The module whose forward makes this layer's (single) self-attention kernel call.
    arm: str
    # The module whose output is this layer's attention output after its output projection, video
    # tokens only. None where the projection is shared with other features (a single-stream block's
    # linear2 mixes attention and MLP): the kernel's output is then the place to act.
    output: str | None


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one model call's self-attention sequence."""

    tokens_per_frame: int
    text_tokens: int = 0
    text_first: bool = False

    def video_span(self, seq_len: int) -> tuple[int, int] | None:
        """(first video token, frame count) in a sequence of seq_len tokens, or None when the
        sequence does not hold whole frames (not a video self-attention call)."""
        video = seq_len - self.text_tokens
        if video <= 0 or video % self.tokens_per_frame:
            return None
        start = self.text_tokens if self.text_first else 0
        return start, video // self.tokens_per_frame


def patched_tokens(size: int, patch: int) -> int:
    """Tokens along one axis after ComfyUI pads to the patch size."""
    return (size + patch - 1) // patch


class FamilyAdapter:
    name = ""
    # ComfyUI wrapper type that sees the latent of every model call.
    wrapper_type = "diffusion_model"

    def matches(self, diffusion_model) -> bool:
        raise NotImplementedError

    def sites(self, diffusion_model) -> list[AttentionSite]:
        raise NotImplementedError

    def layout(self, diffusion_model, x, args, kwargs) -> TokenLayout:
        raise NotImplementedError


def _adapters() -> list[FamilyAdapter]:
    from . import wan
    return [wan.ADAPTER]


def supported_families() -> list[str]:
    return [a.name for a in _adapters()]


def adapter_for(model_patcher) -> FamilyAdapter:
    """The adapter of the model's family, or a ValueError that lists the supported families."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    for adapter in _adapters():
        if adapter.matches(diffusion_model):
            return adapter
    raise ValueError(
        f"model: {type(diffusion_model).__name__} is not a supported video model. "
        f"Supported families: {', '.join(supported_families())}."
    )
