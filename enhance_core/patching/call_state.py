"""State that a clone's hooks share during one model call, and where its video tokens are.

ComfyUI's multi-GPU work units run the model calls of one step concurrently, one thread per device,
so what hooks pass between the layers of a call lives per thread. It is set when the call starts and
gone when it ends, an interrupted call included: nothing of one call reaches the next.
"""

import threading

import comfy.patcher_extension

from .attention_slot import apply_model_options


class CallState(threading.local):
    """The model call running on this thread. A subclass's class attributes are the values outside
    a call."""

    layout = None  # the call's token layout, where per_model_call was given the family adapter

    def clear(self) -> None:
        self.__dict__.clear()  # back to the class attributes

    def video_span(self, t):
        """The video tokens of a hidden state t of this call: None (all of it), a (start, stop) pair
        on the token dim (-2) of a joint [batch, tokens, channels] sequence or of an unbatched
        [tokens, channels] one (MiniMax H3's packed sequence), or False (no whole frames: not a
        video call)."""
        if self.layout is None or t.ndim not in (2, 3):
            return None  # a 5-D grid (Cosmos)
        found = self.layout.video_tokens(t.shape[-2])
        if found is None:
            return False
        start, stop, _ = found
        return None if (start, stop) == (0, t.shape[-2]) else (start, stop)


def video_of(t, span):
    """The video tokens of t at `span` (CallState.video_span): a view."""
    return t if span is None else t[..., span[0]:span[1], :]


def with_video(t, span, video):
    """t with its video tokens at `span` replaced by `video`, as a new tensor (video itself when
    span is None)."""
    if span is None:
        return video
    out = t.clone()
    out[..., span[0]:span[1], :] = video
    return out


def per_model_call(clone, key: str, state: CallState, start, adapter=None) -> None:
    """Around every model call of `clone`: state takes the attributes start(transformer_options)
    returns (a dict) and loses them when the call ends. With the family adapter, state.layout is
    the call's token layout, from the adapter's wrapper (it sees the latent)."""
    def around(executor, x, *args, **kwargs):
        state.__dict__.update(start(apply_model_options(args, kwargs)))
        try:
            return executor(x, *args, **kwargs)
        finally:
            state.clear()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, around)
    if adapter is None:
        return

    def layout(executor, x, *args, **kwargs):
        state.layout = adapter.layout(executor.class_obj, x, args, kwargs)
        return executor(x, *args, **kwargs)
    clone.add_wrapper_with_key(adapter.wrapper_type, key + "_layout", layout)
