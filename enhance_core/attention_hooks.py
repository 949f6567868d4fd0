"""The patch points every method of the pack shares: ComfyUI's attention override, hooked copies of
attention modules (installed as object patches on a clone), and the user-facing layer lists.

Nothing here touches the model a user passed in: callers clone it first, and ComfyUI restores
object patches when the clone is unloaded.
"""

import copy
import functools
import re

import torch

OVERRIDE_KEY = "optimized_attention_override"
# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
# skip_output_reshape=False, ...): the optional arguments in their positional order.
KERNEL_OPTIONAL_ARGS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def add_attention_override(model_patcher, handler):
    """Route every attention kernel call of `model_patcher` through
    handler(call_next, q, k, v, heads, **kwargs).

    `call_next` runs the attention ComfyUI chose, or an override that was already installed
    (SageAttention patches, other packs, another of our nodes): the slot holds one function, so
    the previous one is wrapped, not replaced.
    """
    options = model_patcher.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)

    def override(func, *args, **kwargs):
        if previous is None:
            call_next = func
        else:
            call_next = functools.partial(previous, func)
        return handler(call_next, *args, **kwargs)

    options[OVERRIDE_KEY] = override


def tokens_view(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """The q/k/v a kernel receives as [B, L, H, D]: [B, H, L, D] when the caller set skip_reshape,
    else [B, L, H*D]."""
    if skip_reshape:
        return t.transpose(1, 2)
    b, n, _ = t.shape
    return t.view(b, n, heads, -1)


class _Hooked:
    """Marker base of the hooked module classes made by `hooked_copy`."""


@functools.lru_cache(maxsize=None)
def _hooked_class(base: type) -> type:
    def forward(self, *args, **kwargs):
        call = super(cls, self).forward
        for around in self._freevideo_arounds:
            call = functools.partial(around, call)
        return call(*args, **kwargs)

    cls = type(f"Hooked{base.__name__}", (_Hooked, base), {"forward": forward, "_freevideo_base": base})
    return cls


def hooked_copy(module: torch.nn.Module, around) -> torch.nn.Module:
    """A copy of `module` whose forward runs around(call_original, *args, **kwargs).

    The copy is shallow: it shares the parameters, buffers and child modules (the same dicts), so
    weight patches, LoRAs and low-VRAM casting that ComfyUI applies by module path reach the same
    tensors, and module names do not change. Hooking a hooked copy stacks: the newest runs
    outermost. Install it with `model_patcher.add_object_patch(path, copy)`.
    """
    if isinstance(module, _Hooked):
        base, arounds = module._freevideo_base, module._freevideo_arounds
    else:
        base, arounds = type(module), ()
    new = copy.copy(module)
    new.__class__ = _hooked_class(base)
    new._freevideo_arounds = arounds + (around,)
    return new


class SelfAttentionLayers:
    """Routes the self-attention kernel calls of chosen layers of a clone to a handler.

    The family adapter's wrapper records the token layout of every model call; a hook on each
    chosen layer's `arm` module marks its next kernel call, which the attention override hands to
    handler(layer, layout, call_next, q, k, v, heads, **kwargs). Every other kernel call (cross-
    attention, unchosen layers) goes straight to `call_next`. Model calls run one at a time, so the
    per-call state lives here.
    """

    def __init__(self, clone, adapter, key: str):
        self.clone = clone
        self.adapter = adapter
        self.sites = adapter.sites(clone.get_model_object("diffusion_model"))
        self.layout = None
        self._armed = None
        self._handler = None
        clone.add_wrapper_with_key(adapter.wrapper_type, key, self._model_call)
        add_attention_override(clone, self._attention)

    def route(self, layers, handler) -> None:
        self._handler = handler
        for layer in layers:
            self.hook_module(self.sites[layer].arm, self._arm(layer))

    def hook_module(self, path: str, around) -> None:
        """Object-patch the module at `path` (relative to the diffusion model) on the clone with a
        hooked copy; hooking the same path twice stacks."""
        key = f"diffusion_model.{path}"
        self.clone.add_object_patch(key, hooked_copy(self.clone.get_model_object(key), around))

    def _arm(self, layer):
        def around(call, *args, **kwargs):
            self._armed = layer
            try:
                return call(*args, **kwargs)
            finally:
                # Never leak into another module's kernel call (a model variant whose kernel call
                # bypasses the override would otherwise hand its arm to the next call).
                self._armed = None
        return around

    def _model_call(self, executor, x, *args, **kwargs):
        self.layout = self.adapter.layout(executor.class_obj, x, args, kwargs)
        self._armed = None
        try:
            return executor(x, *args, **kwargs)
        finally:
            self.layout = self._armed = None

    def _attention(self, call_next, q, k, v, heads, *args, **kwargs):
        # Some callers pass the kernel's optional arguments by position (LTX-Video's masked
        # cross-attention passes mask): handlers see them by name.
        kwargs.update(zip(KERNEL_OPTIONAL_ARGS, args))
        layer, self._armed = self._armed, None
        if layer is None or self.layout is None:
            return call_next(q, k, v, heads, **kwargs)
        return self._handler(layer, self.layout, call_next, q, k, v, heads, **kwargs)


def parse_layer_list(text: str, count: int, input_name: str) -> list[int]:
    """Parse a user list such as "0-9, 20" into sorted layer indices; empty or "all" is every layer."""
    text = text.strip().lower()
    if text in ("", "all"):
        return list(range(count))
    chosen = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"{input_name}: cannot read '{part}'; use indices and ranges such as '0-9, 20', or 'all'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ValueError(f"{input_name}: range '{part}' runs backwards")
        if hi >= count:
            raise ValueError(f"{input_name}: layer {hi} does not exist; this model has {count} self-attention layers (0-{count - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


class SigmaWindow:
    """The part of the sampling run a method is active in, from ComfyUI's start/end percent."""

    def __init__(self, model_patcher, start_percent: float, end_percent: float):
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1")
        sampling = model_patcher.get_model_object("model_sampling")
        self.sigma_start = float(sampling.percent_to_sigma(start_percent))
        self.sigma_end = float(sampling.percent_to_sigma(end_percent))
        self._last = (None, True)

    def contains(self, transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        # Every layer of one model call sees the same sigmas tensor: read it (a device sync on
        # GPUs) once per call, not once per layer.
        if self._last[0] is not sigmas:
            sigma = float(sigmas.max())
            self._last = (sigmas, self.sigma_end <= sigma <= self.sigma_start)
        return self._last[1]
