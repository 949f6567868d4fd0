"""One small adapter per native ComfyUI video model family.

An adapter says where each self-attention layer of its family is (which module makes the kernel
call, which module's output is the attention output after its projection) and how the tokens of a
model call are laid out (tokens per latent frame, text tokens and where they sit). The methods
themselves are family-agnostic and index self-attention layers by their position in `sites()`.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention layer. Paths are relative to the diffusion model."""

    # The module whose forward makes this layer's (single) self-attention kernel call; or, with
    # `disarm`, a module that runs just before that call (such as its q projection).
    arm: str
    # The module whose output is this layer's attention output after its output projection, video
    # tokens only. None where the projection is shared with other features (a single-stream block's
    # linear2 mixes attention and MLP): the kernel's output is then the place to act. In joint
    # attention whose projection also carries the text tokens (CogVideoX), only the video tokens of
    # the output are scaled.
    output: str | None
    # The output is [tokens, batch, channels] instead of [batch, tokens, channels] (Cosmos 1.0), or
    # [tokens, channels] from a model that runs one batch element without its dimension (MiniMax H3).
    output_seq_first: bool = False
    # The module in whose forward `output`'s result goes through a scale-invariant RMS norm before
    # the gate and the residual (Mochi's sandwich norm): a plain scale of `output` would cancel, so
    # a method acts on that norm's result instead.
    normalized_in: str | None = None
    # Where `arm` only precedes the kernel call: the module that runs right after it (the output
    # projection), which closes the layer. Hooking children of the attention module, not the module
    # itself, leaves its path free for other packs that patch its forward (ComfyUI restores nested
    # object patches in the order they were applied, which would leave one of them behind).
    disarm: str | None = None


@dataclass(frozen=True)
class BlockSite:
    """One transformer block, numbered as `sites()` numbers its self-attention layers. Paths are
    relative to the diffusion model; the block's first forward argument is its hidden state, and
    its output is that state (or a tuple starting with it)."""

    path: str
    # The module inside the block whose first positional argument is the block's hidden state (plus
    # any per-block addition such as a position embedding) and whose output is what the block's
    # self-attention forms q, k, v from; the residual stream does not go through it. None where a
    # normalisation function, not a module, is applied to the hidden state to form it.
    attention_input: str | None


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one model call's self-attention sequence."""

    tokens_per_frame: int
    text_tokens: int = 0
    text_first: bool = False
    # Joint attention whose text length is only known inside the model (HunyuanVideo appends byT5
    # and vision tokens, Mochi crops padding): the video frame count, the rest of the sequence is
    # text. None: the video is what text_tokens leaves.
    frames: int | None = None

    def video_span(self, seq_len: int) -> tuple[int, int] | None:
        """(first video token, frame count) in a sequence of seq_len tokens, or None when the
        sequence does not hold whole frames (not a video self-attention call)."""
        if self.frames is not None:
            video = self.frames * self.tokens_per_frame
            text = seq_len - video
            if video <= 0 or text < 0:
                return None
        else:
            text = self.text_tokens
            video = seq_len - text
            if video <= 0 or video % self.tokens_per_frame:
                return None
        start = text if self.text_first else 0
        return start, video // self.tokens_per_frame

    def video_tokens(self, seq_len: int) -> tuple[int, int, int] | None:
        """(start, stop, frames) of the video tokens in a sequence of seq_len tokens, or None (see
        video_span)."""
        span = self.video_span(seq_len)
        if span is None:
            return None
        return span[0], span[0] + span[1] * self.tokens_per_frame, span[1]


def patched_tokens(size: int, patch: int) -> int:
    """Tokens along one axis after ComfyUI pads to the patch size."""
    return (size + patch - 1) // patch


def is_instance_of(obj, module: str, name: str) -> bool:
    """isinstance against a ComfyUI class that older ComfyUI versions do not have (False there)."""
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, cls)


class FamilyAdapter:
    name = ""
    # ComfyUI wrapper type that sees the latent of every model call.
    wrapper_type = "diffusion_model"
    # Block name of ComfyUI's block-replace points (patches_replace["dit"][(name, i)]) where block i
    # holds self-attention layer i, so branches can share the blocks before the layer they change.
    prefix_blocks = None
    # The most batch elements one model call takes, where the model limits it (None: no limit).
    max_batch = None

    def prefix_points(self, diffusion_model) -> list[tuple[str, int]] | None:
        """ComfyUI's block-replace points (patches_replace["dit"] keys) in self-attention layer
        order, for guidance branches that share the blocks before their first changed layer; None
        where the family has none."""
        if self.prefix_blocks is None:
            return None
        return [(self.prefix_blocks, i) for i in range(len(self.sites(diffusion_model)))]

    def matches(self, diffusion_model) -> bool:
        raise NotImplementedError

    def refusal(self, diffusion_model) -> str | None:
        """Why a model this adapter matches (its backbone class) must still not be patched, or None:
        a variant the methods cannot act on, refused at patch time rather than left unpatched."""
        return None

    def sites(self, diffusion_model) -> list[AttentionSite]:
        raise NotImplementedError

    def blocks(self, diffusion_model) -> list[BlockSite]:
        raise NotImplementedError

    def layout(self, wrapped, x, args, kwargs) -> TokenLayout:
        """The layout of one model call, from what the wrapper sees: `wrapped` is the diffusion
        model for "diffusion_model" wrappers, the model_base model for "apply_model"."""
        raise NotImplementedError


def _adapters() -> list[FamilyAdapter]:
    from . import cogvideox, cosmos, hunyuan_video, kandinsky5, ltx2, ltxv, minimax_h3, mochi, wan
    return [wan.ADAPTER, hunyuan_video.ADAPTER, ltx2.ADAPTER, ltxv.ADAPTER, mochi.ADAPTER, cosmos.PREDICT2_ADAPTER,
            cosmos.COSMOS1_ADAPTER, cogvideox.ADAPTER, kandinsky5.ADAPTER, minimax_h3.ADAPTER]


def supported_families() -> list[str]:
    return [a.name for a in _adapters()]


def adapter_for(model_patcher) -> FamilyAdapter:
    """The adapter of the model's family, or a ValueError that lists the supported families."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    for adapter in _adapters():
        if adapter.matches(diffusion_model):
            why = adapter.refusal(diffusion_model)
            if why is not None:
                raise ValueError(f"model: {type(diffusion_model).__name__} is not supported, although it shares the "
                                 f"{adapter.name} backbone: {why}")
            return adapter
    raise ValueError(
        f"model: {type(diffusion_model).__name__} is not a supported video model. "
        f"Supported families: {', '.join(supported_families())}."
    )
