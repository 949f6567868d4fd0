"""Cross-layer feature accumulation (RepVideo, Si et al. 2025) on a clone of a ComfyUI video model,
without training; docs/nodes/feature_accumulation.md describes it and how it differs from the paper.

The reference rule (CogVideoX-2B): before layer i the hidden state h becomes
    g_i * mean(cache) + (1 - g_i) * h,
the cache holding the outputs since the last group boundary: after layer i it restarts with that
output when i % m == 0, else the output is appended; before layer 0 it holds layer 0's input. Here
the gates are fixed, the cache is a running sum and a count (video tokens only), and "attention
input" mode mixes only what the block forms q, k, v from (the adapter's `attention_input` module,
or LTX-Video's RMS norm function); "block input" mode replaces the block's whole input.

Hooks: hooked copies of the blocks (and attention-input modules) as object patches, not
`patches_replace["dit"]` block entries: those are one slot per block that a later node overwrites,
Cosmos and CogVideoX have none, and Kandinsky 5's passes arguments its blocks do not take.
"""

import inspect
import logging
import math

import torch
from torch.overrides import TorchFunctionMode

import comfy.patcher_extension

from ..models import adapter_for
from ..patching.call_state import CallState, per_model_call, video_of, with_video
from ..patching.layer_lists import format_ranges, parse_layer_list
from ..patching.module_hooks import hook_module, module_of
from ..patching.sigma_window import SigmaWindow

log = logging.getLogger(__name__)

MODES = ("attention input", "block input")
# Our default, not the paper's: its gates were learned together with the weights (starting at 0.5).
# Weights that never saw the mix get g x (group mean - h) added to each mixed layer's input; 0.1
# keeps that a small correction.
DEFAULT_GATE = "0.1"
DEFAULT_GROUP_SIZE = 6  # the reference's


def parse_gates(text: str, n_layers: int, selected: list[int]) -> dict[int, float]:
    """The gate of every selected layer from "0.1" (all layers), one value per model layer, or one
    value per selected layer ("0.1, 0.1, 0.2")."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts) or not all(parts):
        raise ValueError(f"gate: '{text}' has an empty value; give one number from 0 to 1 (e.g. '0.1') or a "
                         "comma-separated list such as '0.1, 0.1, 0.2'")
    values = []
    for part in parts:
        try:
            g = float(part)
        except ValueError:
            raise ValueError(f"gate: cannot read '{part}' as a number; use numbers from 0 to 1 such as '0.1' "
                             "or '0.1, 0.1, 0.2'") from None
        if not (math.isfinite(g) and 0.0 <= g <= 1.0):
            raise ValueError(f"gate: {part} is outside 0-1 (0 = layer unchanged, 1 = replaced by the group mean)")
        values.append(g)
    if len(values) == 1:
        return {layer: values[0] for layer in selected}
    if len(values) == n_layers:
        return {layer: values[layer] for layer in selected}
    if len(values) == len(selected):
        return dict(zip(selected, values))
    raise ValueError(f"gate: {len(values)} values given; give one value for every layer, one per model layer "
                     f"({n_layers}), or one per layer chosen in 'layers' ({len(selected)})")


class GroupAccumulator:
    """The reference's cache as a running sum and a count: `add` after each layer (restart when
    layer % group_size == 0), `mix` before one."""

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.sum = None
        self.count = 0
        # (layer, its output as it left our hook): to follow a change of batch rows, and to tell
        # that a block's input is the previous block's output. Dropped with the sum.
        self.last = None

    def add(self, layer: int, out: torch.Tensor, whole: torch.Tensor | None = None) -> None:
        """Add `out` (a layer's video tokens) to the sum; `whole` is what the layer returned (default: out)."""
        if layer % self.group_size == 0 or self.sum is None:
            if self.sum is not None and self.sum.shape == out.shape and self.sum.dtype == out.dtype:
                self.sum.copy_(out)  # reuse the buffer: no second sum while the restart is made
            else:
                self.sum = None  # freed before its successor is allocated
                self.sum = out.clone(memory_format=torch.contiguous_format)
            self.count = 1
        else:
            self.sum.add_(out)
            self.count += 1
        self.last = (layer, out if whole is None else whole)

    def last_output(self, layer: int):
        """Layer `layer`'s output as it left our hook, if that was the last one added."""
        return self.last[1] if self.last is not None and self.last[0] == layer else None

    def follow_rows(self, layer: int, h: torch.Tensor) -> bool:
        """A block input h (whole) with other batch rows than the sum: the blocks before ran on
        fewer rows and their results were copied into the rest (guidance branches that copy a cond,
        run by a shared-prefix block patch). Give every row of h the sum of the previous output's
        row it equals; False (and the sum dropped) where that cannot be told."""
        last = self.last_output(layer - 1)
        if last is not None and h.shape[1:] == last.shape[1:]:
            rows = [next((j for j in range(last.shape[0]) if torch.equal(h[r], last[j])), None) for r in range(h.shape[0])]
            if None not in rows:
                self.sum = self.sum[rows]
                return True
        self.drop()
        return False

    def mix(self, h: torch.Tensor, gate: float, in_place: bool = False) -> torch.Tensor:
        """gate * mean + (1 - gate) * h: into h itself when `in_place`, else as one new tensor."""
        scaled = h.mul_(1.0 - gate) if in_place else torch.mul(h, 1.0 - gate)
        return scaled.add_(self.sum, alpha=gate / self.count)

    def drop(self) -> None:
        self.sum, self.count, self.last = None, 0, None


def plan(selected_gates: dict[int, float], group_size: int) -> tuple[dict[int, float], set[int]]:
    """(layers that mix -> gate, layers whose output must enter the sum). Layer 0's cache is its
    own input: it never mixes. A layer right after a restart still mixes: its cache holds the
    previous output, which is not its input where the model changes the state between blocks
    (Cosmos 1 adds a position embedding in place). A layer's output is needed when a mixing layer
    after it, in the same group, averages it."""
    mixing = {i: g for i, g in selected_gates.items() if g > 0 and i > 0}
    needed = set()
    for i in mixing:
        needed.update(range(group_size * ((i - 1) // group_size), i))
    return mixing, needed


class _Call(CallState):
    """What the hooks of the model call running on this thread share."""
    active = False
    acc = None
    pending = None  # (block input, its video span, the mix) until the block forms its attention input

    def take_mixed_input(self, a):
        """What the block's attention input `a` becomes, from the pending mix (taken: freed after)."""
        h, span, mixed = self.pending
        self.pending = None
        new = with_video(h, span, mixed)
        del mixed
        if a is not h:
            # The block added something to its state first (a per-block position embedding): keep it.
            new = a + (new - h).to(a.dtype)
        return new


def _norm_function(func) -> bool:
    return (func is torch.nn.functional.rms_norm or func is torch.nn.functional.layer_norm
            or getattr(func, "_qualified_op_name", None) in ("comfy_kitchen::rms_adaln", "comfy_kitchen::adaln"))


class _NormInput(TorchFunctionMode):
    """While a block runs: the first normalisation function applied to the block's input (by
    identity) gets the pending mix instead. For blocks that form their attention input with a
    function (LTX-Video), or with a fused kernel in place of the adapter's module (newer ComfyUI)."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.call.pending is not None and args and args[0] is self.call.pending[0] and _norm_function(func):
            args = (self.call.take_mixed_input(args[0]),) + tuple(args[1:])
        return func(*args, **(kwargs or {}))


def _hidden_parameter(block) -> str:
    """The name of a block's first forward argument, its hidden state (some models pass it by name)."""
    original = getattr(block, "_freevideo_original", block)  # another node's hooked copy of the block
    return list(inspect.signature(type(original).forward).parameters)[1]


class FeatureAccumulation:
    """The settings and hooks of one node's clone; what a model call accumulates is in `call`."""

    def __init__(self, clone, gate: str = DEFAULT_GATE, group_size: int = DEFAULT_GROUP_SIZE,
                 mode: str = "attention input", layers: str = "all", start_percent: float = 0.0, end_percent: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode: '{mode}' is not one of: {', '.join(MODES)}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: {group_size!r} must be a whole number of layers, 1 or more (the reference uses 6)")
        adapter = adapter_for(clone)
        blocks = adapter.blocks(clone.get_model_object("diffusion_model"))
        selected = parse_layer_list(layers, len(blocks), "layers")
        gates = parse_gates(gate, len(blocks), selected)
        self.window = SigmaWindow(clone, start_percent, end_percent)
        self.mode, self.group_size = mode, group_size
        self.mixing, self.needed = plan(gates, group_size)
        self.last_mixing = max(self.mixing, default=None)
        self.window.follow(clone)
        self.call = _Call()
        self._warned = False
        if not self.mixing:
            return  # every gate 0 (or only layer 0 chosen): a plain clone, bit-identical
        key = f"freevideo_feature_accumulation_{id(self)}"
        state = self  # closures, not bound methods: ComfyUI deep-copies model_options on clone
        per_model_call(clone, key, self.call,
                       lambda options: {"active": state.window.contains(options), "acc": GroupAccumulator(group_size)}, adapter)
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key,
                                   lambda executor, *a, **kw: state._log_run(executor, *a, **kw))
        for i in sorted(set(self.mixing) | self.needed):
            site = blocks[i]
            hidden_name = _hidden_parameter(module_of(clone, site.path)[1])
            hook_module(clone, site.path, self._block_hook(i, hidden_name))
            if mode == "attention input" and i in self.mixing and site.attention_input is not None:
                hook_module(clone, site.attention_input, self._attention_input_hook)

    def _log_run(self, executor, *args, **kwargs):
        layers = sorted(self.mixing)
        gates = sorted(set(self.mixing.values()))
        log.info("Cross-layer feature accumulation (RepVideo, experimental): %s mode, gate %s on layer(s) %s, groups of %d "
                 "layers; between sigma %.4g and %.4g. Training-free: the paper fine-tuned with learned gates.",
                 self.mode, gates[0] if len(gates) == 1 else "per layer " + ", ".join(f"{self.mixing[i]:g}" for i in layers),
                 format_ranges(layers), self.group_size, self.window.sigma_start, self.window.sigma_end)
        return executor(*args, **kwargs)

    def _block_hook(self, layer: int, hidden_name: str):
        gate, record, call = self.mixing.get(layer), layer in self.needed, self.call

        def around(forward, *args, **kwargs):
            if not call.active:
                return forward(*args, **kwargs)
            hidden = args[0] if args else kwargs[hidden_name]
            h = hidden[0] if isinstance(hidden, tuple) else hidden  # LTX-2's (video, audio): the video is mixed
            span = call.video_span(h)
            if span is False:
                return forward(*args, **kwargs)
            acc = call.acc
            if acc.sum is not None and acc.sum.shape != video_of(h, span).shape and not acc.follow_rows(layer, h):
                self._warn_rows(layer)
            if gate is None or not acc.count:
                out = forward(*args, **kwargs)
            elif self.mode == "block input":
                out = self._run_on_block_input(forward, args, kwargs, hidden_name, layer, gate, hidden, h, span)
            else:
                out = self._run_on_attention_input(forward, args, kwargs, layer, gate, h, span)
            if record:
                hidden_out = out if torch.is_tensor(out) else out[0]
                acc.add(layer, video_of(hidden_out, span), hidden_out)
            if layer == self.last_mixing:
                acc.drop()  # no later layer reads the sum
            return out
        return around

    def _run_on_block_input(self, forward, args, kwargs, hidden_name, layer, gate, hidden, h, span):
        acc = self.call.acc
        # When h is the previous block's output exactly as it left our hook (nothing between the
        # blocks made a new tensor of it), its only other holder is the model's loop variable,
        # which the block's output replaces: mix into it rather than beside it, one hidden state
        # less at the block's peak. Not under autograd.
        in_place = acc.last_output(layer - 1) is h and not (torch.is_grad_enabled() and h.requires_grad)
        mixed = acc.mix(video_of(h, span), gate, in_place)
        new = h if in_place else with_video(h, span, mixed)
        new = (new,) + hidden[1:] if isinstance(hidden, tuple) else new
        del mixed
        if args:
            return forward(new, *args[1:], **kwargs)
        return forward(**dict(kwargs, **{hidden_name: new}))

    def _run_on_attention_input(self, forward, args, kwargs, layer, gate, h, span):
        call = self.call
        # Only the pending slot holds the mix, until the attention-input module's hook (or, where a
        # norm function or a fused kernel forms that input, _NormInput) takes it.
        call.pending = (h, span, call.acc.mix(video_of(h, span), gate))
        try:
            with _NormInput(call):
                out = forward(*args, **kwargs)
        finally:
            missed, call.pending = call.pending, None
        if missed is not None:
            raise RuntimeError(f"Cross-layer feature accumulation: block {layer} did not form its attention input "
                               "where the model adapter expects it (ComfyUI changed the block)")
        return out

    def _attention_input_hook(self, forward, *args, **kwargs):
        if self.call.pending is None:
            return forward(*args, **kwargs)
        return forward(self.call.take_mixed_input(args[0]), *args[1:], **kwargs)

    def _warn_rows(self, layer):
        if not self._warned:
            self._warned = True
            log.warning("Cross-layer feature accumulation: the batch changed inside a model call before block %d "
                        "(another node runs some blocks on part of the batch); the running mean restarts there", layer)


def apply_feature_accumulation(model, gate: str = DEFAULT_GATE, group_size: int = DEFAULT_GROUP_SIZE,
                               mode: str = "attention input", layers: str = "all", start_percent: float = 0.0,
                               end_percent: float = 1.0):
    """A clone of `model` with cross-layer feature accumulation; every gate 0 gives a plain clone."""
    clone = model.clone()
    FeatureAccumulation(clone, gate, group_size, mode, layers, start_percent, end_percent)
    return clone
