"""Step caches beside our MODEL nodes: ComfyUI-TeaCache and ComfyUI-MagCache (unmodified snapshots,
support/step_caches.py), each placed before and after each of our nodes on the tiny Wan 2.1 (CFG 5)
and the tiny HunyuanVideo 1.0 (CFG 1, the only CFG these caches' HunyuanVideo code handles).

Both caches replace the diffusion model's forward_orig while the model runs, with a copy that calls
the blocks without ComfyUI's per-call transformer_options, and keep their state per cond index (cond
0, uncond 1) on Wan. Every case checks the cache still skips the calls it skips alone (counted) and
that the model is clean afterwards; what our node does there is one of three outcomes, measured:
- "acts": feature accumulation hooks the blocks themselves. The first call (computed by both caches,
  same input everywhere) gives what our node alone gives, not what the cache alone gives; the result
  differs from the cache alone.
- "bypassed": the attention methods put their hook in the attention-override slot of the call's
  transformer_options, which the replaced forward never hands to the blocks. The result is the
  cache's alone, and our node said so in the log at the first model call.
- "refused": IE-Adapt guidance and editing add conds (branches) to a step, which the caches' Wan
  code has no state for (it keeps cond 0 and uncond 1: a KeyError inside the cache), and could not
  act anyway: at the first model call they stop sampling with an error that names the replaced
  forward and the step caches, before the cache runs.
ComfyUI versions whose internals the packs do not import (0.33: they import a LTX-Video function
that moved) skip with the ImportError, as ComfyUI lists the packs there: IMPORT FAILED.
"""

import logging
from dataclasses import dataclass

import pytest
import torch

import comfy.patcher_extension
import comfy.utils
from freevideo.enhance_core.methods.attention_inspector import inspect_attention
from freevideo.enhance_core.patching.module_hooks import _Hooked
from freevideo.nodes.enhance_a_video import EnhanceAVideo
from freevideo.nodes.entropy_editing import EntropyEditing
from freevideo.nodes.entropy_guidance import EntropyGuidance
from freevideo.nodes.feature_accumulation import FeatureAccumulation
from support import families, step_caches
from support.node_calls import run_node
from support.sampling import ksample, relative_max, text_conditioning, video_latent

# MagCache's numpy arithmetic warns under NumPy 2 (its code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
STEPS = 6
# An effect counts as present when it moves the result by more than this (relative to its largest
# value); equivalent computations here differ by ~1e-6.
EFFECT = 1e-3
ORDERS = ("cache before ours", "cache after ours")


# --- the two families ----------------------------------------------------------------------------
@dataclass
class Setting:
    """A family as the caches see it: the model, how it is sampled, the cache's model_type for it,
    and the modules that run on every model call (skipped or not) and only on computed ones."""

    model: object
    latent: dict
    positive: list
    negative: list
    source: list  # the editing node's source prompt
    cfg: float
    model_type: dict  # cache -> its model_type
    every_call: str
    in_blocks: str

    def counter(self):
        dm = self.model.get_model_object("diffusion_model")
        get = comfy.utils.get_attr
        return step_caches.CallCounter(get(dm, self.every_call), get(dm, self.in_blocks))


_settings = {}


@pytest.fixture(params=["wan21", "hunyuan_video"])
def setting(request, wan21):
    if request.param not in _settings:
        if request.param == "wan21":
            _settings["wan21"] = Setting(wan21, video_latent(frames=3, height=8, width=8), text_conditioning(seed=1),
                                         text_conditioning(seed=2), text_conditioning(seed=3), 5.0,
                                         {"TeaCache": "wan2.1_t2v_1.3B", "MagCache": "wan2.1_t2v_1.3B"},
                                         "head", "blocks.3.ffn")
        else:
            fam = families.BY_ID["hunyuan_video"]
            _settings["hunyuan_video"] = Setting(
                families.load(fam), families.latent(fam), families.conditioning(fam, 1), families.conditioning(fam, 2),
                families.conditioning(fam, 3), 1.0, {"TeaCache": "hunyuan_video", "MagCache": "hunyuan_video"},
                "final_layer", "single_blocks.1")
    return _settings[request.param]


# --- the caches ----------------------------------------------------------------------------------
def pack(name: str):
    try:
        return step_caches.load_pack(f"ComfyUI-{name}")
    except step_caches.Unavailable as e:
        pytest.skip(str(e))


def teacache(model, model_type: str):
    m = pack("TeaCache").TeaCache().apply_teacache(model, model_type, 1.0, 0.0, 1.0, "cpu")[0]
    # TeaCache's coefficients map the relative change of the timestep embedding between calls to an
    # output change, fitted to one real model. The tiny model's embedding changes by ~0.9 a step,
    # which every shipped fit turns into a refresh at every call (or none at all). Fitted to the tiny
    # model here: the change itself, so threshold 1 reuses about every other call.
    m.model_options["transformer_options"]["coefficients"] = [0.0, 0.0, 0.0, 1.0, 0.0]
    return m


def magcache(model, model_type: str):
    # The node's defaults (threshold 0.06, retention 0.2, at most 2 calls reused in a row).
    return pack("MagCache").MagCache().apply_magcache(model, model_type, 0.06, 0.2, 2, 0, -1)[0]


CACHES = {"TeaCache": teacache, "MagCache": magcache}


# --- our nodes -----------------------------------------------------------------------------------
OURS = {
    "enhance_a_video": lambda m, s: run_node(EnhanceAVideo, model=m, weight=40.0)[0],
    "entropy_guidance": lambda m, s: run_node(EntropyGuidance, model=m, scale=3.0)[0],
    "entropy_editing": lambda m, s: run_node(EntropyEditing, model=m, source_positive=s.source, ratio=0.5)[0],
    "feature_accumulation": lambda m, s: run_node(FeatureAccumulation, model=m, gate="0.5", mode="block input")[0],
}
NAMES = {"enhance_a_video": "Enhance-A-Video", "entropy_guidance": "IE-Adapt guidance",
         "entropy_editing": "IE-Adapt editing", "feature_accumulation": "feature accumulation"}


def expected(family: str, node: str) -> str:
    if node == "feature_accumulation":
        return "acts"
    if node in ("entropy_guidance", "entropy_editing"):
        return "refused"
    return "bypassed"


# --- sampling with a record of the model calls -----------------------------------------------------
class Outputs:
    """An APPLY_MODEL wrapper on a clone that keeps every model call's output."""

    def __init__(self, model):
        self.outputs = []
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_step_caches", self._record)

    def _record(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.outputs.append(out.detach().clone())
        return out


@dataclass
class Run:
    result: torch.Tensor
    first: torch.Tensor  # the first model call's output
    calls: int
    skipped: int


def sample(s: Setting, model, steps: int = STEPS) -> Run:
    recorder = Outputs(model)
    with s.counter() as n:
        result = ksample(recorder.model, s.latent, s.positive, s.negative, steps=steps, cfg=s.cfg)
    return Run(result, recorder.outputs[0], n.calls, n.skipped)


_references = {}


def reference(s: Setting, what: str, build, steps: int = STEPS) -> Run:
    key = (id(s), what)
    if key not in _references:
        _references[key] = sample(s, build(), steps)
    return _references[key]


def assert_clean(s: Setting, what: str):
    """Nothing of the graph is left on the model the user passed: it samples what it sampled
    before, bit for bit (one step is enough to tell), and then runs its own modules and its own
    forward (ComfyUI keeps a clone's object patches on the shared model until another clone loads)."""
    plain = _references[(id(s), "plain, one step")]
    after = sample(s, s.model, steps=1)
    assert torch.equal(after.result, plain.result), f"{what}: the plain model samples differently afterwards"
    dm = s.model.get_model_object("diffusion_model")
    assert "forward_orig" not in vars(dm), f"{what}: the model's forward_orig is still replaced"
    hooked = [name for name, m in dm.named_modules() if isinstance(m, _Hooked)]
    assert not hooked, f"{what}: hooked modules left on the model: {hooked}"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node", list(OURS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_step_cache_beside_our_node(setting, cache, node, order, caplog, request):
    s = setting
    family = request.node.callspec.params["setting"]
    model_type = s.model_type[cache]

    def with_cache(m):
        return CACHES[cache](m, model_type)

    def ours(m):
        return OURS[node](m, s)

    pack(cache)  # skips here where the pack is absent or does not import
    plain = reference(s, "plain", lambda: s.model)
    reference(s, "plain, one step", lambda: s.model, steps=1)  # before any graph of this module ran
    try:
        cache_alone = reference(s, cache, lambda: with_cache(s.model))
    except Exception as e:  # the cache's own code against this ComfyUI, with no node of ours
        pytest.skip(f"{cache} alone fails on {family} in this ComfyUI, with no node of ours: {type(e).__name__}: {e}")
    ours_alone = reference(s, node, lambda: ours(s.model))
    assert cache_alone.skipped > 0, f"test set-up: {cache} skipped no call alone ({cache_alone.calls} calls)"
    assert ours_alone.skipped == 0

    caplog.set_level(logging.WARNING)
    model = ours(with_cache(s.model)) if order == ORDERS[0] else with_cache(ours(s.model))
    what = f"{cache} x {NAMES[node]} on {family} ({order})"
    outcome = expected(family, node)
    if outcome == "refused":
        with pytest.raises(RuntimeError, match=f"^{NAMES[node]} cannot act on this model: another node replaced "
                                               "the model's forward .*TeaCache and MagCache"):
            sample(s, model)
        print(f"{what}: refused at the first model call")
        assert_clean(s, what)
        return

    both = sample(s, model)
    figures = (f"{what}: {both.skipped} of {both.calls} calls skipped ({cache} alone {cache_alone.skipped} of "
               f"{cache_alone.calls}); relative change: ours alone {relative_max(ours_alone.result, plain.result):.2e}, "
               f"with the cache vs the cache alone {relative_max(both.result, cache_alone.result):.2e}")
    if outcome == "acts":  # the first calls hold the same conds
        figures += (f"; first call vs ours alone {relative_max(both.first, ours_alone.first):.2e}, vs the cache alone "
                    f"{relative_max(both.first, cache_alone.first):.2e}")
    print(figures)
    assert torch.isfinite(both.result).all(), figures
    # The cache still skips what it skips alone: its decision does not depend on our node's effect.
    assert both.skipped == cache_alone.skipped, figures
    assert relative_max(ours_alone.result, plain.result) > EFFECT, f"{NAMES[node]} does nothing here alone. {figures}"
    warned = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith(f"{NAMES[node]} cannot act") and "replaced the model's forward" in r.getMessage()]
    if outcome == "acts":
        # The first call is computed by both caches from the same input as our node's alone.
        torch.testing.assert_close(both.first, ours_alone.first, rtol=1e-5, atol=1e-5, msg=figures)
        assert relative_max(both.first, cache_alone.first) > EFFECT, figures
        assert relative_max(both.result, cache_alone.result) > EFFECT, figures
        assert not warned, warned
    else:
        assert relative_max(both.result, cache_alone.result) < 1e-5, figures
        assert warned, f"{what}: our node did not say it cannot act. {figures}"
    assert_clean(s, what)


@pytest.mark.parametrize("cache", list(CACHES))
def test_inspector_on_a_cached_model(wan21, cache):
    """The Attention Inspector measures with one model call of its own: behind TeaCache, whose copy of
    the model's forward would measure nothing, it stops first and says why; MagCache fails on its own
    on a call outside a sampling run (it divides by the run's step count) before the model runs."""
    model = CACHES[cache](wan21, "wan2.1_t2v_1.3B")
    latent, prompt = video_latent(frames=3, height=8, width=8), text_conditioning(seed=1)
    if cache == "TeaCache":
        with pytest.raises(RuntimeError, match="^Attention inspector cannot act on this model: another node replaced"):
            inspect_attention(model, latent, prompt, 1.0)
    else:
        with pytest.raises(ZeroDivisionError) as failure:
            inspect_attention(model, latent, prompt, 1.0)
        assert "freevideo-peers-" in str(failure.traceback[-1].path), failure.traceback[-1]
