"""Shared prefix: a branch that copies one of the step's conds (same input, sigma and prompt) computes
exactly what that cond computes in every block before the first block it changes. Where the family
has ComfyUI's block-replace points (`patches_replace["dit"]`), those blocks run without the branch's
elements and the cond's hidden state is copied into their rows afterwards.
"""

import torch

from ..patching.attention_call import cond_of_rows
from ..patching.attention_slot import eager
from .branches import batch_plan


class SharedPrefix:
    """Block-replace patches (ComfyUI's `patches_replace["dit"]`, keyed (block_name, i)) that run the
    blocks before a call's `prefix` point without the branches that copy a cond, then copy that
    cond's hidden state into the branches' rows: the same result, without their cost there. A patch
    already on a block is called inside ours; a node that replaces ours later only loses the saving.
    `points`: the replace points in self-attention layer order (the family adapter's prefix_points)."""

    def __init__(self, clone, key: str, points: list[tuple[str, int]]):
        replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for layer, (block_name, i) in enumerate(points):
            clone.set_model_patch_replace(eager(self._block(key, layer, replaces.get((block_name, i))), recursive=False),
                                          "dit", block_name, i)

    @staticmethod
    def _block(key, i, previous):
        def run(args, extra):
            return previous(args, extra) if previous is not None else extra["original_block"](args)

        def replace(args, extra):
            options = args.get("transformer_options") or {}
            plan = batch_plan(options, key)
            if plan is None or plan.prefix is None or i >= plan.prefix[0]:
                return run(args, extra)
            img = args["img"]
            b = img.shape[0]
            rows = cond_of_rows(options, b)
            # Only where the copied cond is in this forward (ComfyUI splits the batch when memory is short).
            copies = {branch: source for branch, source in plan.prefix[1].items() if branch in rows and source in rows}
            if not copies:
                return run(args, extra)
            keep = [r for r, c in enumerate(rows) if c not in copies]
            index = torch.tensor(keep, device=img.device)
            sub = {name: _rows(value, index, b) for name, value in args.items()}
            sub["transformer_options"] = dict(options, cond_or_uncond=[c for c in options["cond_or_uncond"] if c not in copies])
            # Every stream the block returns (the video; Mochi's text too) gets the branches' rows back.
            return {name: _with_copies(part, index, rows, copies) for name, part in run(sub, extra).items()}
        return replace


def _rows(value, index, batch: int):
    """The rows `index` of every tensor in a block argument whose first dimension is the batch,
    also inside tuples and lists (LTX-Video's position embedding in newer ComfyUI)."""
    if torch.is_tensor(value):
        return value.index_select(0, index) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, index, batch) for v in value)
    return value


def _with_copies(part, index, rows: list[int], copies: dict):
    """A block output computed on the rows `index` of the full batch (whose rows belong to the conds
    `rows`), back at full batch size, each branch's rows a copy of its source cond's rows."""
    if not (torch.is_tensor(part) and part.ndim and part.shape[0] == len(index)):
        return part
    full = part.new_empty((len(rows),) + tuple(part.shape[1:]))
    full[index] = part
    for branch, source in copies.items():
        full[[r for r, c in enumerate(rows) if c == branch]] = full[[r for r, c in enumerate(rows) if c == source]]
    return full
