"""One view of a routed self-attention kernel call, made once per call and handed to every method.

It says what every method needs about the call and would otherwise re-derive: the sequence length
and whether it is square (the whole sequence attending to itself), the video tokens and their frame
count, which cond (cond, uncond, a branch) each batch row belongs to, the mask's rows, q/k/v in the
layouts the methods need, and a way to run the kernel (whatever the override slot chained below us).
"""

import functools
from dataclasses import dataclass

import torch

from .attention_slot import calls_kernel

MAPS = ("video tokens", "whole map")


@dataclass(frozen=True)
class VideoSpan:
    """The video tokens of a sequence: [start, stop), `frames` latent frames of equal size."""

    start: int
    stop: int
    frames: int


def cond_of_rows(transformer_options: dict, batch: int) -> list[int]:
    """The cond index of every batch row of a model call (ComfyUI stacks equal chunks per cond, in
    the order of transformer_options["cond_or_uncond"])."""
    groups = transformer_options.get("cond_or_uncond") or [0]
    per = batch // len(groups)
    return [groups[i // per] for i in range(batch)]


class AttentionCall:
    def __init__(self, layer: int, layout, call_next, q, k, v, heads: int, kwargs: dict):
        self.layer, self.layout = layer, layout
        self.q, self.k, self.v, self.heads = q, k, v, heads
        self.kwargs = kwargs  # the kernel's optional arguments, by name
        self._next = call_next
        self.options = kwargs.get("transformer_options") or {}
        self.skip_reshape = kwargs.get("skip_reshape", False)
        self.skip_output_reshape = kwargs.get("skip_output_reshape", False)
        self.token_axis = 2 if self.skip_reshape else 1
        self.batch = q.shape[0]
        self.seq_len = q.shape[self.token_axis]
        # The whole sequence attending to itself; not a layer that splits its queries over calls.
        self.square = k.shape[self.token_axis] == self.seq_len

    # rows ---------------------------------------------------------------------------------------
    @functools.cached_property
    def conds(self) -> list[int]:
        """The cond index of every batch row."""
        return cond_of_rows(self.options, self.batch)

    def rows(self, *conds) -> list[int]:
        return [i for i, c in enumerate(self.conds) if c in conds]

    @property
    def mask(self):
        return self.kwargs.get("mask")

    def mask_rows(self, index: torch.Tensor):
        """The mask for the batch rows `index`: its rows where it has a batch dimension, else itself."""
        mask = self.mask
        if mask is None or mask.ndim < 3 or mask.shape[0] != self.batch or self.batch == 1:
            return mask
        return mask.index_select(0, index)

    # tokens -------------------------------------------------------------------------------------
    @functools.cached_property
    def video(self) -> VideoSpan | None:
        """The video tokens, where this is a square call over whole frames; else None."""
        if not self.square or self.layout is None:
            return None
        span = self.layout.video_tokens(self.seq_len)
        return None if span is None else VideoSpan(*span)

    def map_span(self, attention_map: str) -> tuple[int, int] | None:
        """(start, stop) of the tokens whose map a method measures or replaces ("video tokens"), or
        None for the whole map (asked for, or the sequence is all video)."""
        video = self.video
        if attention_map == "whole map" or video is None or (video.start, video.stop) == (0, self.seq_len):
            return None
        return video.start, video.stop

    def heads_first(self, t: torch.Tensor) -> torch.Tensor:
        """q/k/v as [B, H, L, D]: as given when the caller set skip_reshape, else from [B, L, H*D]."""
        if self.skip_reshape:
            return t
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def tokens_first(self, t: torch.Tensor) -> torch.Tensor:
        """q/k/v as [B, L, H, D]."""
        if self.skip_reshape:
            return t.transpose(1, 2)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1)

    def output_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """A kernel output as [B, L, ...] (a view)."""
        return out.transpose(1, 2) if self.skip_output_reshape else out

    # kernel -------------------------------------------------------------------------------------
    @property
    def next_is_kernel(self) -> bool:
        """Whether what runs below us is the kernel itself, not another override (which may keep
        per-call state shaped like the whole batch)."""
        return calls_kernel(self._next)

    def run(self, q=None, k=None, v=None, **changes):
        """The kernel (and whatever override is chained below us) on these q, k, v (default: the
        call's own) with the call's other arguments, some changed."""
        return self._next(self.q if q is None else q, self.k if k is None else k, self.v if v is None else v,
                          self.heads, **dict(self.kwargs, **changes))
