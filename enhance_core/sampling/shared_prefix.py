"""Shared prefix: a branch that copies one of the step's conds (same input, sigma and prompt) computes
exactly what that cond computes in every block before the first block it changes. Where the family
has ComfyUI's block-replace points (`patches_replace["dit"]`), those blocks run without the branch's
elements and the cond's hidden state is copied into their rows afterwards.

Exact only entry for entry: a cond may hold several entries (ConditioningCombine), each its own batch
element, and ComfyUI may put any of them in another forward (its memory estimate, multi-GPU work
units). A branch entry is paired with the cond entry it copies through the entry's uuid (the branch
holds the cond's own entries); one whose cond entry is not in this forward runs its blocks in full.
"""

import logging

import torch

from ..patching.attention_slot import eager
from .branches import batch_plan

log = logging.getLogger(__name__)

# Patches ComfyUI runs between blocks, on the whole batch after the block returns: they see the
# branch rows we copied back. Any other patch (Wan's attn1_patch / attn2_patch in newer ComfyUI,
# which MultiTalk uses to read audio of the whole batch) runs inside the block, beside fewer rows.
BETWEEN_BLOCKS = {"double_block"}


class SharedPrefix:
    """Block-replace patches (ComfyUI's `patches_replace["dit"]`, keyed (block_name, i)) that run the
    blocks before a call's `prefix` point without the branches that copy a cond, then copy that
    cond's hidden state into the branches' rows: the same result, without their cost there. A patch
    already on a block is called inside ours; a node that replaces ours later only loses the saving.
    `points`: the replace points in self-attention layer order (the family adapter's prefix_points)."""

    def __init__(self, clone, key: str, points: list[tuple[str, int]], name: str):
        self.name = name
        self._said = set()
        replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for layer, (block_name, i) in enumerate(points):
            clone.set_model_patch_replace(eager(self._block(key, layer, replaces.get((block_name, i))), recursive=False),
                                          "dit", block_name, i)

    def _once(self, what: str, message: str, *args) -> None:
        if what not in self._said:
            self._said.add(what)
            log.info(message, *args)

    def _block(self, key, i, previous):
        def run(args, extra):
            return previous(args, extra) if previous is not None else extra["original_block"](args)

        def replace(args, extra):
            options = args.get("transformer_options") or {}
            plan = batch_plan(options, key)
            if plan is None or plan.prefix is None or i >= plan.prefix[0]:
                return run(args, extra)
            inside = set(options.get("patches") or {}) - BETWEEN_BLOCKS
            if inside:
                self._once("patches", "%s: patches inside the blocks (%s) may read the whole batch; the branches run "
                           "every block in full", self.name, ", ".join(sorted(inside)))
                return run(args, extra)
            img = args["img"]
            b = img.shape[0]
            copies = self._paired_chunks(options, plan.prefix[1])
            if not copies:
                return run(args, extra)
            per = b // len(options["cond_or_uncond"])
            source_of = {r: copies[r // per] * per + r % per for r in range(b) if r // per in copies}
            keep = [r for r in range(b) if r not in source_of]
            index = torch.tensor(keep, device=img.device)
            sub = {name: _rows(value, index, b) for name, value in args.items()}
            sub["transformer_options"] = dict(options, cond_or_uncond=[c for k, c in enumerate(options["cond_or_uncond"])
                                                                       if k not in copies])
            if "uuids" in options:
                sub["transformer_options"]["uuids"] = [u for k, u in enumerate(options["uuids"]) if k not in copies]
            # Every stream the block returns (the video; Mochi's text too) gets the branches' rows back.
            return {name: _with_copies(part, index, source_of) for name, part in run(sub, extra).items()}
        return replace

    def _paired_chunks(self, options, branch_sources: dict) -> dict:
        """{chunk of a branch entry: chunk of the cond entry it copies} in this forward. ComfyUI stacks
        one chunk per cond entry, cond index in cond_or_uncond and entry uuid in uuids; a branch chunk
        is paired only with the one chunk of its source cond that has its uuid."""
        groups, uuids = options.get("cond_or_uncond") or [], options.get("uuids")
        if not any(c in branch_sources for c in groups):
            return {}
        if uuids is None or len(uuids) != len(groups) or any(u is None for u in uuids):
            self._once("uuids", "%s: this forward does not say which cond entry each batch element is; the branches "
                       "run every block in full", self.name)
            return {}
        where = {}
        for k, (c, u) in enumerate(zip(groups, uuids)):
            where.setdefault((c, u), []).append(k)
        copies, alone = {}, 0
        for k, (c, u) in enumerate(zip(groups, uuids)):
            if c not in branch_sources:
                continue
            sources = where.get((branch_sources[c], u), [])
            if len(sources) == 1 and len(where[(c, u)]) == 1:
                copies[k] = sources[0]
            else:
                alone += 1
        if alone:
            self._once("split", "%s: ComfyUI put %d branch element(s) in a forward without the cond entry they copy "
                       "(a split batch or several devices); those run every block in full", self.name, alone)
        return copies


def _rows(value, index, batch: int):
    """The rows `index` of every tensor in a block argument whose first dimension is the batch,
    also inside tuples and lists (LTX-Video's position embedding in newer ComfyUI)."""
    if torch.is_tensor(value):
        return value.index_select(0, index) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, index, batch) for v in value)
    return value


def _with_copies(part, index, source_of: dict):
    """A block output computed on the rows `index` of the full batch, back at full batch size, each
    branch row (a key of source_of) a copy of its source row."""
    b = len(index) + len(source_of)
    if not (torch.is_tensor(part) and part.ndim and part.shape[0] == len(index)):
        return part
    full = part.new_empty((b,) + tuple(part.shape[1:]))
    full[index] = part
    rows = list(source_of)
    full[rows] = full[[source_of[r] for r in rows]]
    return full
