"""Rows of one cond paired with rows of another in a sampling step, whatever forwards ComfyUI puts
them in.

ComfyUI batches only conds whose text has the same shape (and the same ControlNet and patches),
splits a batch when its memory estimate says so, and on several devices runs forwards at once; a
cond with several entries (ConditioningCombine) runs as one chunk of rows per entry, perhaps in
several forwards. A method that hands target rows something computed on their source's rows
(editing: the source's q and k) pairs them here, entry by entry: in one forward directly; else the
forward that runs a source entry without all of its targets leaves its values in the step's store
(step_store.py), and a target that runs before its source finds nothing, for the method to evaluate
it again once the store is filled.
"""

from dataclasses import dataclass

import comfy.samplers


@dataclass(frozen=True)
class CondPairs:
    entries: dict  # cond index -> [uuid of each entry] (ComfyUI gives every entry its own)
    sources: dict  # target cond index -> its source cond index

    @classmethod
    def of(cls, conds, sources: dict) -> "CondPairs":
        return cls({i: [e.get("uuid") for e in c] for i, c in enumerate(conds) if c is not None}, dict(sources))

    def source_entry(self, target: int, j: int) -> int:
        """The source entry target entry j pairs with: in order; a target with more entries than its
        source pairs its extra ones with the source's last."""
        return min(j, len(self.entries[self.sources[target]]) - 1)

    def apart(self, conds, x, sigma) -> set:
        """The source conds with an entry ComfyUI cannot batch with a target entry it pairs with
        (text of another shape, other ControlNets or patches, other hooks: its can_concat_cond and
        hook groups): they never share a forward with that target."""
        def batched(c, e):
            return comfy.samplers.get_area_and_mult(conds[c][e], x, sigma)
        out = set()
        for target, source in self.sources.items():
            for j in range(len(self.entries.get(target, ()))):
                a, b = batched(target, j), batched(source, self.source_entry(target, j))
                if a is None or b is None or a.hooks != b.hooks or not comfy.samplers.can_concat_cond(a, b):
                    out.add(source)
        return out

    def chunks(self, options: dict, batch: int) -> dict:
        """{(cond index, entry): the batch rows of that entry} of one model call."""
        groups = options.get("cond_or_uncond") or [0]
        uuids = options.get("uuids") or [None] * len(groups)
        per = batch // len(groups)  # ComfyUI stacks equal chunks, one per entry
        out = {}
        for i, (c, u) in enumerate(zip(groups, uuids)):
            found = self.entries.get(c, [])
            out[(c, found.index(u) if u in found else 0)] = slice(i * per, (i + 1) * per)
        return out

    def pair(self, options: dict, batch: int, key, store, values) -> list:
        """One model call's targets, each as (target cond, its rows, its source's values or None).
        values(rows) gives what a source's rows hand to their targets; a source entry whose targets
        are not all in this call leaves them in `store` under (key, target cond, entry)."""
        chunks = self.chunks(options, batch)
        for target, source in self.sources.items():
            for e in range(len(self.entries.get(source, ()))):
                waiting = [j for j in range(len(self.entries.get(target, ()))) if self.source_entry(target, j) == e]
                if (source, e) in chunks and any((target, j) not in chunks for j in waiting):
                    store.put((key, target, e), *values(chunks[(source, e)]))
        found = []
        for (c, j), rows in chunks.items():
            if c in self.sources:
                e = self.source_entry(c, j)
                here = chunks.get((self.sources[c], e))
                found.append((c, rows, values(here) if here is not None else store.get((key, c, e))))
        return found
