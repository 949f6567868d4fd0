"""Routing of a clone's chosen self-attention layers to a method.

The family adapter's wrapper records the token layout of every model call; a hook on each chosen
layer's `arm` module marks its next kernel call, which the attention override hands to the method
as one AttentionCall. Every other kernel call (cross-attention, unchosen layers) goes straight on.
That per-call state is per thread: ComfyUI's multi-GPU work units run model calls of one step
concurrently, one thread per device. A routed layer that did not run, or ran its attention outside
ComfyUI's attention functions (a neighbour replaced the module or its kernel), is named in the log
once, at the first model call where it happens: the method cannot act there.
"""

import logging
import threading
import weakref

from .attention_call import AttentionCall
from .attention_slot import KERNEL_OPTIONAL_ARGS, add_attention_override, eager
from .layer_lists import format_ranges
from .module_hooks import follow_deep_clones, hook_module

log = logging.getLogger(__name__)


class _RoutingState(threading.local):
    """The routing state of the model call running on this thread."""
    layout = None
    armed = None

    def __init__(self):
        self.ran = set()  # routed layers whose module ran in this call
        self.bypassed = set()  # ... and made no kernel call through the override


class SelfAttentionLayers:
    def __init__(self, clone, adapter, key: str, name: str, fail_if_bypassed: bool = False):
        # Weakly: the clone's wrappers hold this object, and a cycle between them would keep the
        # clone (and the model it holds) alive until a full garbage collection, which ComfyUI then
        # runs before every model load.
        self._clone = weakref.ref(clone)
        self.adapter = adapter
        self.name = name
        # Raise, rather than warn, where a neighbour bypasses every layer (methods whose extra conds
        # or measurements would otherwise fail obscurely or mean nothing).
        self.fail_if_bypassed = fail_if_bypassed
        self.sites = adapter.sites(clone.get_model_object("diffusion_model"))
        self.call = _RoutingState()
        self._handler = None
        self._routed = set()
        self._warned = False
        clone.add_wrapper_with_key(adapter.wrapper_type, key, eager(self._model_call, recursive=False))
        add_attention_override(clone, key, self._attention)
        follow_deep_clones(clone)

    def route(self, layers, handler) -> None:
        """Hand every kernel call of `layers` to handler(call: AttentionCall) -> kernel output."""
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
        hook_module(self._clone(), path, around)

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
        if "forward_orig" in vars(getattr(executor.class_obj, "diffusion_model", executor.class_obj)):
            self._forward_replaced()
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

    def _forward_replaced(self) -> None:
        # TeaCache and MagCache set the model's forward_orig on the instance for the call; their copy
        # runs the blocks without the call's transformer_options, where our attention override lives.
        why = (f"{self.name} cannot act on this model: another node replaced the model's forward for this call "
               "(forward_orig, as the step caches TeaCache and MagCache do), which runs the blocks without ComfyUI's "
               f"per-call options, so no layer reaches {self.name}")
        if self.fail_if_bypassed:
            raise RuntimeError(f"{why}. Take the step cache out of this model's chain (ComfyUI's EasyCache keeps the "
                               "model's forward).")
        if not self._warned:
            self._warned = True
            log.warning("%s; it is not applied", why)

    def _report_unreached(self, call) -> None:
        if self._warned:
            return
        missing, bypassed = sorted(self._routed - call.ran), sorted(call.bypassed)
        if missing or bypassed:
            self._warned = True
            why = []
            if missing:
                why.append(f"layer(s) {format_ranges(missing)} did not run (another node replaced or skipped them)")
            if bypassed:
                why.append(f"layer(s) {format_ranges(bypassed)} computed attention outside ComfyUI's attention functions "
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
        return self._handler(AttentionCall(layer, call.layout, call_next, q, k, v, heads, kwargs))
