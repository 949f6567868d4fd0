"""Our nodes stacked with a neighbour on the tiny Wan 2.1, for the stacking and compile tests: our two
attention nodes as ComfyUI runs them, both orders of a stack, sampling, an effect check and a
recorder of the model calls."""

import torch

import comfy.patcher_extension
from freevideo.nodes.enhance_a_video import EnhanceAVideo
from freevideo.nodes.entropy_guidance import EntropyGuidance
from support.node_calls import run_node
from support.sampling import ksample, text_conditioning, video_latent

POS, NEG = text_conditioning(seed=1), text_conditioning(seed=2)
# An effect counts as present when it moves the result by more than this (relative to the result's
# largest value); float noise between equivalent computations here is ~1e-6.
EFFECT = 1e-3


def enhance(model, **kw):
    return run_node(EnhanceAVideo, model=model, **dict(dict(weight=40.0, start_percent=0.0, end_percent=1.0, layers="all"), **kw))[0]


def guidance(model, **kw):
    return run_node(EntropyGuidance, model=model, **dict(dict(scale=3.0, layers="1"), **kw))[0]


OURS = {"enhance_a_video": enhance, "entropy_guidance": guidance}
ORDERS = ["neighbour before ours", "neighbour after ours"]


def stack(ours, neighbour, model, order):
    return ours(neighbour(model)) if order == ORDERS[0] else neighbour(ours(model))


def sample(model, latent=None, steps=2, **kw):
    return ksample(model, latent or video_latent(frames=5), POS, NEG, steps=steps, **kw)


def change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between two results, relative to the first one's largest value."""
    return float((a - b).abs().max() / a.abs().max())


def assert_effect(with_it, without, what):
    assert change(with_it, without) > EFFECT, f"{what}: no effect (relative change {change(with_it, without):.2e})"


class ModelCalls:
    """An APPLY_MODEL wrapper on a clone that records each model call's sigma, latent frame count and
    conds (one entry per call), and runs `after(record)` once the call returned."""

    KEY = "test_stacking_recorder"

    def __init__(self, after=None):
        self.calls = []
        self.after = after

    def __call__(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.KEY, self._wrapper)
        return m

    def _wrapper(self, executor, x, t, *args, **kwargs):
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else args[3]
        record = dict(sigma=float(t.max()), frames=x.shape[2], conds=len(options.get("cond_or_uncond") or [0]))
        self.calls.append(record)
        out = executor(x, t, *args, **kwargs)
        if self.after is not None:
            self.after(record)
        return out
