"""IE-Adapt's registry: per-layer means of a measure (attention entropy) over one measuring pass,
and the layers it picks. ComfyUI's multi-GPU work units measure layers concurrently, hence the lock."""

import threading

import torch


class LayerSums:
    def __init__(self):
        self._lock = threading.Lock()
        self._sums = {}

    def add(self, layer, values: torch.Tensor) -> None:
        total, count = float(values.sum()), values.numel()
        with self._lock:
            before, n = self._sums.get(layer, (0.0, 0))
            self._sums[layer] = (before + total, n + count)

    def __len__(self) -> int:
        return len(self._sums)

    def take_means(self) -> dict:
        """{layer: mean} in layer order; the sums start again empty."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return {layer: total / count for layer, (total, count) in sorted(sums.items())}


def highest(entropies: dict, k: int) -> list:
    """The k layers of highest entropy (ties: the lower index), sorted (the guidance's registry)."""
    return sorted(sorted(entropies, key=lambda layer: (-entropies[layer], layer))[:k])


def lowest(entropies: dict, ratio: float) -> list:
    """The lowest `ratio` of the layers by entropy, sorted (editing's choice: low entropy holds the
    structure)."""
    ranked = sorted(entropies, key=lambda layer: (entropies[layer], layer))
    return sorted(ranked[:round(ratio * len(ranked))])
