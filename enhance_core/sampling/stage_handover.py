"""A branch's state carried from one sampling run to the next when a graph samples in stages.

Two KSamplerAdvanced stages (Wan 2.2's two experts, or one model with the steps split) hand a
latent from the first sampler to the second, and nothing else: that latent identifies the run the
second one continues. A run that ends above sigma 0 records, under the latent it returns, what its
branch reached there; a run that starts from that latent (and adds no noise) finds it by value.
"""

import collections
import math
import threading

import torch

# Finished stages kept: enough for a few graphs' hand-overs in one queue; each holds two latents.
KEPT = 8


class StageHandover:
    def __init__(self):
        self._lock = threading.Lock()
        self._ended = collections.deque(maxlen=KEPT)

    def record(self, latent: torch.Tensor, sigmas, levels: dict, state) -> None:
        """A run on `sigmas` returned `latent` (as the next sampler receives it): where it ended
        above sigma 0 with the branch's latent there (levels: {sigma: latent}), keep both and `state`."""
        end = float(sigmas[-1])
        if end > 0 and end in levels:
            with self._lock:
                self._ended.append((latent.detach().float().cpu(), end, levels[end], state))

    def find(self, latent: torch.Tensor, noise: torch.Tensor, sigmas, levels: dict):
        """For a run on `sigmas` that starts from `latent` with no noise added, a finished stage that
        returned that latent at that level (the newest): its branch latent goes into `levels`, its
        state is returned; else None."""
        if bool(noise.any()):
            return None
        latent, first = latent.detach().float().cpu(), float(sigmas[0])
        with self._lock:
            ended = list(self._ended)
        for kept, level, branch, state in reversed(ended):
            if kept.shape == latent.shape and math.isclose(level, first, rel_tol=1e-5) \
                    and float((kept - latent).abs().max()) <= 1e-6 * max(1.0, float(kept.abs().max())):
                levels[first] = branch
                return state
        return None
