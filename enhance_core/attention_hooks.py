"""The patch points every method of the pack shares: ComfyUI's attention override, hooked copies of
attention modules (installed as object patches on a clone), and the user-facing layer lists.

Nothing here touches the model a user passed in: callers clone it first, and ComfyUI restores
object patches when the clone is unloaded.

Three things make the hooks survive the user's graph:
- The attention override is put in the slot when the model is called (an APPLY_MODEL wrapper), not
  when the node runs: a node applied later that overwrites the slot (ComfyUI's attention-backend
  node, other packs' Sage/flash patches) is then wrapped too, whatever the order of the graph.
- Per-call state (token layout, the armed layer) is per thread: ComfyUI's multi-GPU work units run
  model calls of one step concurrently, one thread per device.
- A multi-GPU deep clone has a freshly loaded model of its own: the hooked copies are re-made on
  that model's modules (ON_DEEPCLONE_MULTIGPU), so each device computes with its own weights.
"""

import functools
import logging
import re
import threading

import torch

import comfy.patcher_extension
import comfy.utils

log = logging.getLogger(__name__)

OVERRIDE_KEY = "optimized_attention_override"
# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
# skip_output_reshape=False, ...): the optional arguments in their positional order.
KERNEL_OPTIONAL_ARGS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")
# BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...): the
# position of transformer_options after x, as APPLY_MODEL wrappers receive it (both versions).
_APPLY_MODEL_OPTIONS_ARG = 4


def apply_model_options(args, kwargs) -> dict:
    """The per-call transformer_options an APPLY_MODEL wrapper receives (the arguments after x)."""
    return kwargs["transformer_options"] if "transformer_options" in kwargs else args[_APPLY_MODEL_OPTIONS_ARG]


def add_attention_override(model_patcher, key: str, handler):
    """Route every attention kernel call of `model_patcher` through
    handler(call_next, q, k, v, heads, **kwargs).

    `call_next` runs whatever the call's override slot held when the model was called (another
    pack's or ComfyUI's attention function, another of our nodes), else the attention ComfyUI
    chose: the slot holds one function, so the previous one is wrapped, never dropped.
    """
    chained = {}  # previous override -> our override around it; one stable function per
                  # neighbour, so torch.compile's guards see the same object at every call

    def chain(previous):
        if previous not in chained:
            if previous is None:
                def override(func, *args, **kwargs):
                    return handler(func, *args, **kwargs)
            else:
                def override(func, *args, **kwargs):
                    return handler(functools.partial(previous, func), *args, **kwargs)
            chained[previous] = eager(override)
        return chained[previous]

    def install(executor, x, *args, **kwargs):
        options = apply_model_options(args, kwargs)
        previous = options.get(OVERRIDE_KEY)
        options[OVERRIDE_KEY] = chain(previous)
        try:
            return executor(x, *args, **kwargs)
        finally:
            if previous is None:
                options.pop(OVERRIDE_KEY, None)
            else:
                options[OVERRIDE_KEY] = previous

    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, install)


def eager(fn, recursive: bool = True):
    """`fn` run by Python even inside a torch.compile'd model (TorchCompileModel): our hooks read
    per-call state that compiled code would guard on (and recompile for) or cannot trace. A graph
    break at each hook; with recursive=False what `fn` calls is compiled again."""
    return torch.compiler.disable(fn, recursive=recursive)


def calls_kernel(call_next) -> bool:
    """Whether an override's call_next is the attention kernel itself, not another override (which
    may keep per-call state shaped like the whole batch)."""
    return not isinstance(call_next, functools.partial)


def tokens_view(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """The q/k/v a kernel receives as [B, L, H, D]: [B, H, L, D] when the caller set skip_reshape,
    else [B, L, H*D]."""
    if skip_reshape:
        return t.transpose(1, 2)
    b, n, _ = t.shape
    return t.view(b, n, heads, -1)


class _Hooked:
    """Marker base of the hooked module classes made by `hooked_copy`."""


def _hooked_forward(self, *args, **kwargs):
    call = functools.partial(type(self)._freevideo_base.forward, self)
    for around in type(self)._freevideo_arounds:
        call = functools.partial(around, call)
    return call(*args, **kwargs)


def hooked_copy(module: torch.nn.Module, around) -> torch.nn.Module:
    """A copy of `module` whose forward runs around(call_original, *args, **kwargs).

    The copy shares the module's whole instance state (its __dict__: parameters, buffers, children,
    and the per-module flags ComfyUI sets when it patches weights and casts for low VRAM), so weight
    patches and LoRAs that ComfyUI applies by module path reach the same tensors, and its record of
    which modules hold patched weights stays true whichever of the two sits in the model; module
    names do not change. Only the class differs: the hooks live on a class made for this copy.
    Hooking a hooked copy stacks: the newest runs outermost. Install it with
    `model_patcher.add_object_patch(path, copy)`.
    """
    if isinstance(module, _Hooked):
        return _hooked(module._freevideo_original, module._freevideo_arounds + (around,))
    return _hooked(module, (around,))


def _hooked(original: torch.nn.Module, arounds: tuple) -> torch.nn.Module:
    base = type(original)
    cls = type(f"Hooked{base.__name__}", (_Hooked, base), {
        "forward": eager(_hooked_forward), "_freevideo_base": base, "_freevideo_original": original,
        "_freevideo_arounds": arounds})
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", original.__dict__)
    return new


def _rehook_on_deep_clone(source, deep_clone) -> None:
    """ON_DEEPCLONE_MULTIGPU: the deep clone copied our object patches, which share the source
    model's parameters; re-make each on the deep clone's own (freshly loaded) module at that path."""
    for path, patch in list(deep_clone.object_patches.items()):
        if isinstance(patch, _Hooked):
            own = comfy.utils.get_attr(deep_clone.model, path)
            if isinstance(own, _Hooked):  # a reused deep clone whose patches are still applied
                own = own._freevideo_original
            if own is not patch._freevideo_original:
                deep_clone.object_patches[path] = _hooked(own, patch._freevideo_arounds)


def _follow_deep_clones(model_patcher) -> None:
    # Only ComfyUI versions with multi-GPU deep clones have this callback; elsewhere nothing to do.
    event = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if event is not None and not model_patcher.get_all_callbacks(event):
        model_patcher.add_callback_with_key(event, "freevideo_rehook", _rehook_on_deep_clone)


def hook_module(model_patcher, path: str, around) -> None:
    """Object-patch the module at `path` (relative to the diffusion model) of `model_patcher` with a
    hooked copy running around(call_original, *args, **kwargs); hooking a path twice stacks, and the
    copy is re-made on a multi-GPU deep clone's own module."""
    key = f"diffusion_model.{path}"
    model_patcher.add_object_patch(key, hooked_copy(model_patcher.get_model_object(key), around))
    _follow_deep_clones(model_patcher)


class _CallState(threading.local):
    """The state of the model call running on this thread."""
    layout = None
    armed = None

    def __init__(self):
        self.ran = set()  # routed layers whose module ran in this call
        self.bypassed = set()  # ... and made no kernel call through the override


class SelfAttentionLayers:
    """Routes the self-attention kernel calls of chosen layers of a clone to a handler.

    The family adapter's wrapper records the token layout of every model call; a hook on each
    chosen layer's `arm` module marks its next kernel call, which the attention override hands to
    handler(layer, layout, call_next, q, k, v, heads, **kwargs). Every other kernel call (cross-
    attention, unchosen layers) goes straight to `call_next`. That per-call state is per thread.
    A routed layer that did not run, or ran its attention outside ComfyUI's attention functions
    (a neighbour replaced the module or its kernel), is named in the log once, at the first model
    call where it happens: the method cannot act there.
    """

    def __init__(self, clone, adapter, key: str, name: str):
        self.clone = clone
        self.adapter = adapter
        self.name = name
        self.sites = adapter.sites(clone.get_model_object("diffusion_model"))
        self.call = _CallState()
        self._handler = None
        self._routed = set()
        self._warned = False
        clone.add_wrapper_with_key(adapter.wrapper_type, key, eager(self._model_call, recursive=False))
        add_attention_override(clone, key, self._attention)
        _follow_deep_clones(clone)

    def route(self, layers, handler) -> None:
        self._handler = handler
        self._routed.update(layers)
        for layer in layers:
            site = self.sites[layer]
            if site.disarm is None:
                self.hook_module(site.arm, self._arm(layer))
            else:
                self.hook_module(site.arm, self._arm_before(layer))
                self.hook_module(site.disarm, self._disarm(layer))

    def hook_module(self, path: str, around) -> None:
        """Object-patch the module at `path` (relative to the diffusion model) on the clone with a
        hooked copy; hooking the same path twice stacks."""
        key = f"diffusion_model.{path}"
        self.clone.add_object_patch(key, hooked_copy(self.clone.get_model_object(key), around))

    def _arm(self, layer):
        call = self.call

        def around(forward, *args, **kwargs):
            call.armed = layer
            call.ran.add(layer)
            try:
                return forward(*args, **kwargs)
            finally:
                # Never leak into another module's kernel call (a model variant whose kernel call
                # bypasses the override would otherwise hand its arm to the next call).
                if call.armed == layer:
                    call.bypassed.add(layer)
                call.armed = None
        return around

    def _arm_before(self, layer):
        call = self.call

        def around(forward, *args, **kwargs):
            if call.armed is not None:  # the previous layer's kernel call never reached us
                call.bypassed.add(call.armed)
            call.armed = layer
            call.ran.add(layer)
            return forward(*args, **kwargs)
        return around

    def _disarm(self, layer):
        call = self.call

        def around(forward, *args, **kwargs):
            if call.armed == layer:
                call.bypassed.add(layer)
                call.armed = None
            return forward(*args, **kwargs)
        return around

    def _model_call(self, executor, x, *args, **kwargs):
        call = self.call
        call.layout = self.adapter.layout(executor.class_obj, x, args, kwargs)
        call.armed = None
        call.ran, call.bypassed = set(), set()
        try:
            out = executor(x, *args, **kwargs)
        finally:
            call.layout = call.armed = None
        self._report_unreached(call)
        return out

    def _report_unreached(self, call) -> None:
        if self._warned:
            return
        missing, bypassed = sorted(self._routed - call.ran), sorted(call.bypassed)
        if missing or bypassed:
            self._warned = True
            why = []
            if missing:
                why.append(f"layer(s) {_ranges(missing)} did not run (another node replaced or skipped them)")
            if bypassed:
                why.append(f"layer(s) {_ranges(bypassed)} computed attention outside ComfyUI's attention functions "
                           "(another node replaced their attention)")
            log.warning("%s cannot act on every layer it was given: %s; it is not applied there", self.name, "; ".join(why))

    def _attention(self, call_next, q, k, v, heads, *args, **kwargs):
        # Some callers pass the kernel's optional arguments by position (LTX-Video's masked
        # cross-attention passes mask): handlers see them by name.
        kwargs.update(zip(KERNEL_OPTIONAL_ARGS, args))
        call = self.call
        layer, call.armed = call.armed, None
        if layer is None or call.layout is None:
            return call_next(q, k, v, heads, **kwargs)
        return self._handler(layer, call.layout, call_next, q, k, v, heads, **kwargs)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


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
            raise ValueError(f"{input_name}: range '{part}' runs backwards; write the lower index first, e.g. '{hi}-{lo}'")
        if hi >= count:
            raise ValueError(f"{input_name}: layer {hi} does not exist; this model has {count} self-attention layers (0-{count - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


class SigmaWindow:
    """The part of the sampling run a method is active in, from ComfyUI's start/end percent."""

    def __init__(self, model_patcher, start_percent: float, end_percent: float):
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1")
        self.percents = (start_percent, end_percent)
        self._bounds(model_patcher)

    def _bounds(self, model_patcher) -> None:
        sampling = model_patcher.get_model_object("model_sampling")
        self.sigma_start = float(sampling.percent_to_sigma(self.percents[0]))
        self.sigma_end = float(sampling.percent_to_sigma(self.percents[1]))
        self._last = (None, True)

    def follow(self, clone) -> None:
        """Take the bounds from the model being sampled at the start of every sampling run, so a
        model-sampling patch applied after the node (ModelSamplingSD3's shift) moves the window."""
        window = self

        def refresh(executor, *args, **kwargs):
            window._bounds(executor.class_obj.model_patcher)
            return executor(*args, **kwargs)
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, f"freevideo_window_{id(self)}", refresh)

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
