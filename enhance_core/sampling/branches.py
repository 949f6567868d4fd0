"""Extra batch elements ("branches") in a sampling step, for the methods that need them: IE-Adapt
guidance's perturbed-attention branches and editing's source branch.

A branch is one more cond appended to the step's calc_cond_batch call, so ComfyUI's own memory check
batches it with cond and uncond in one forward when it fits and splits the batch when not. The
call's plan (per-call transformer_options, under the method's key) gives each cond index a role that
the method's attention handlers read; a branch may bring its own noisy input (editing's source
latent), swapped in for its batch elements just before the model runs (APPLY_MODEL wrapper).

A branch that copies one of the step's conds (`copy_of`) may share the blocks before the first one
it changes with that cond (shared_prefix.py reads the call plan's `prefix`).

Where the family's model takes one batch element per forward (its adapter's `max_batch` is 1:
MiniMax H3), ComfyUI would still batch a branch with the cond it copies (equal conditioning): each
cond then goes to calc_cond_batch on its own, so every forward holds one.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
import comfy.samplers

from ..models import adapter_for
from ..patching.attention_call import cond_of_rows
from ..patching.attention_slot import apply_model_options


@dataclass(frozen=True)
class Branch:
    cond: list | None  # ComfyUI conditioning (a copy of a step's cond, or another prompt's); None: left out of a call
    role: object  # what the method's attention handlers see for this element
    x: torch.Tensor | None = None  # its own input at the step's sigma; None: the step's input
    copy_of: int | None = None  # index of the step's cond it copies exactly (same cond, same input)


@dataclass(frozen=True)
class BatchPlan:
    """What one calc_cond_batch call asks of a method's attention handlers. Not a dict: ComfyUI's
    per-call merge of transformer_options copies dicts but passes other values by reference."""

    roles: dict = field(default_factory=dict)  # cond index -> role
    inputs: dict = field(default_factory=dict)  # cond index -> its own input
    measure: bool = False
    # (first block that differs, {branch cond index: the cond index it copies}) or None
    prefix: tuple | None = None
    payload: object = None  # what else the method's handlers need for this evaluation (the method's own type)


def batch_plan(transformer_options: dict | None, key: str) -> BatchPlan | None:
    return (transformer_options or {}).get(key)


class BranchRunner:
    """Installs `step(args)` as the clone's calc_cond_batch function; `step` evaluates the step's
    conds and its branches through `run` (or `evaluate`)."""

    def __init__(self, clone, key: str, step):
        self.key = key
        self.one_per_forward = adapter_for(clone).max_batch == 1
        # A calc function set before ours (another node's) evaluates the step's own conds.
        self.previous = clone.model_options.get("sampler_calc_cond_batch_function")
        # A closure, not a bound method: ComfyUI copies model_options on every clone.
        clone.set_model_sampler_calc_cond_batch_function(lambda args: step(args))
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, self._own_inputs)

    def evaluate(self, model, conds, x, sigma, model_options, branches=(), measure=False, prefix_until=None,
                 payload=None):
        """calc_cond_batch over conds + branches with this method's plan; None conds are skipped.
        prefix_until: the first block the branches change (blocks before it are shared with the cond
        each branch copies, where SharedPrefix is installed). payload: the plan's payload."""
        n = len(conds)
        copies = {n + j: b.copy_of for j, b in enumerate(branches) if b.copy_of is not None and conds[b.copy_of] is not None}
        plan = BatchPlan({n + j: b.role for j, b in enumerate(branches)},
                        {n + j: b.x for j, b in enumerate(branches) if b.x is not None}, measure,
                        (prefix_until, copies) if prefix_until and copies else None, payload)
        options = model_options.copy()
        options["transformer_options"] = dict(options.get("transformer_options", {}), **{self.key: plan})
        every = list(conds) + [b.cond for b in branches]
        if not self.one_per_forward:
            return comfy.samplers.calc_cond_batch(model, every, x, sigma, options)
        # In cond order, each alone (its index kept: the plan's roles are by index); a None cond
        # gives zeros, as calc_cond_batch gives it.
        return [torch.zeros_like(x) if c is None else
                comfy.samplers.calc_cond_batch(model, [c if j == i else None for j in range(len(every))], x, sigma, options)[i]
                for i, c in enumerate(every)]

    def run(self, args, branches=(), measure=False, base=True, prefix_until=None, payload=None):
        """One step's evaluations: its own conds (when `base`) and the branches, in one call where
        possible. Returns (outputs of the step's conds or None, outputs of the branches). payload:
        the plan's payload, in every evaluation of the step."""
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        n = len(conds)
        if base and branches and self.previous is None:
            res = self.evaluate(model, conds, x, sigma, options, branches, measure, prefix_until, payload)
            return res[:n], res[n:]
        out = None
        if base:
            if self.previous is None:
                out = self.evaluate(model, conds, x, sigma, options, measure=measure, payload=payload)
            else:
                with_plan = options.copy()
                plan = BatchPlan(measure=measure, payload=payload)
                with_plan["transformer_options"] = dict(options.get("transformer_options", {}), **{self.key: plan})
                out = self.previous(dict(args, model_options=with_plan))
        if not branches:
            return out, []
        # The step's conds were evaluated on their own (a chained calc function owns them, or the
        # caller needed them first): the branches go in a second call.
        return out, self.evaluate(model, [None] * n, x, sigma, options, branches, measure=measure and not base,
                                  payload=payload)[n:]

    def run_first(self, args, branches, first: set, payload=None):
        """run(args, branches) with the branches whose cond index (after the step's conds) is in
        `first` evaluated before everything else, on their own. Returns what run returns."""
        n = len(args["conds"])
        if self.one_per_forward:  # every branch runs in a forward of its own anyway
            first = set(range(n, n + len(branches)))
        early = [b if n + j in first else dataclasses.replace(b, cond=None) for j, b in enumerate(branches)]
        rest = [dataclasses.replace(b, cond=None) if n + j in first else b for j, b in enumerate(branches)]
        before = self.run(args, early, base=False, payload=payload)[1] if first else None
        out, later = self.run(args, rest, payload=payload)
        return out, [before[j] if n + j in first else later[j] for j in range(len(branches))]

    def _own_inputs(self, executor, x, *args, **kwargs):
        options = apply_model_options(args, kwargs)
        plan = batch_plan(options, self.key)
        if plan is not None and plan.inputs:
            rows = cond_of_rows(options, x.shape[0])
            x = x.clone()
            window = options.get("context_window")
            for c, own in plan.inputs.items():
                index = [i for i, r in enumerate(rows) if r == c]
                if not index:
                    continue
                if own.shape[2:] != x.shape[2:] and window is not None:
                    # ComfyUI's context windows: the model sees a slice of the frames; so must the branch.
                    own = window.get_tensor(own, x.device)
                x[index] = own.to(x).expand(len(index), *own.shape[1:]) if own.shape[0] == 1 else own.to(x)
        return executor(x, *args, **kwargs)
