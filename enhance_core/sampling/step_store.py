"""Tensors one forward of a sampling step leaves for another forward of the same step.

ComfyUI runs a step's conds in as many forwards as its batching and memory allow, in an order it
picks, and on several devices concurrently (0.33's multi-GPU work units): what a row of one forward
needs from a row of another (editing's source q and k for a target) is kept here until the step
ends. Copies, not views: the forward's own tensors are freed or changed in place after it.
"""

import threading

import torch


class StepStore:
    def __init__(self):
        self._lock = threading.Lock()
        self._items = {}
        self.peak_bytes = 0  # the most the store held at once in the run (for the cost report)

    def put(self, key, *values) -> None:
        """Keep `values` under `key`: tensors as copies, anything else as it is."""
        kept = tuple(v.detach().clone() if torch.is_tensor(v) else v for v in values)
        with self._lock:
            self._items[key] = kept
            held = sum(v.numel() * v.element_size() for vs in self._items.values() for v in vs if torch.is_tensor(v))
            self.peak_bytes = max(self.peak_bytes, held)

    def get(self, key):
        with self._lock:
            return self._items.get(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
