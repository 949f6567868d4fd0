"""IE-Adapt editing in the graphs users build, through ComfyUI's real samplers, batching and nodes
on tiny models: source and target in different forwards (prompts of different lengths, batches split
for memory), two KSamplerAdvanced stages, a start_percent above 0, a real source video over two
stages, context windows, and joint attention over video and text.

What "edited" means here: in a chosen layer, the attention map of every target call (cond and
uncond, every step) is the source's. Without source_latent the source is the video the sampler
makes with the source prompt from the same noise, so at each step its q and k in a layer are those
of a plain run with the source prompt (same seed, same sampler). The tests record q and k as the
attention kernel receives them, with an override the test puts in the model's override slot before
the editing node is applied: the editing wraps it, so it sees the q and k the editing hands on.
Rows are told apart by ComfyUI's cond index (0: the sampler's positive, 1: its negative).

The figures quoted in the docstrings ("measured on the broken code") are the failures these tests
were written against, on ComfyUI 0.3.75.
"""

import functools
import importlib

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import nodes
from freevideo.enhance_core.methods.entropy_editing import apply_entropy_editing
from support.families import BY_ID, FRAMES, conditioning, load, latent as family_latent
from support.node_calls import run_node
from support.sampling import ksample, relative_max, text_conditioning, video_latent

TARGET, SOURCE, NEG = text_conditioning(seed=1), text_conditioning(seed=3), text_conditioning(seed=2)
LATENT = video_latent(frames=5, height=8, width=8)
STEPS = 4
# A result moved by less than this (relative to its largest value) counts as unchanged. Float noise
# between equivalent computations here (another batch size, another split of the steps) is below
# 1e-6; an edit moves the tiny models' results by 1e-2 to 1e-1.
NOISE = 1e-4
# An effect counts as present above this.
EFFECT = 1e-2


_results = {}


def once(key, compute):
    """compute() the first time `key` is asked for in this module (results shared between tests)."""
    if key not in _results:
        _results[key] = compute()
    return _results[key]


@pytest.fixture(scope="module", autouse=True)
def _forget_results():
    yield
    _results.clear()


def fit_only(monkeypatch, model, latent, elements: int):
    """Free memory for `elements` batch elements of `latent` by ComfyUI's own estimate
    (BaseModel.memory_required, linear in the batch, times ComfyUI's margin of 1.5): calc_cond_batch
    then splits larger batches as it does when memory is short. 0.3.75 asks
    comfy.model_management for free memory, newer ComfyUI the patcher."""
    one = model.model.memory_required([1] + list(latent["samples"].shape[1:]))
    free = 1.5 * one * (elements + 0.5)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: free)
    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda *a, **k: free)


# --- q and k as the attention kernel receives them ------------------------------------------------
class KernelRecorder:
    """A clone of `model` whose attention kernel calls made inside the modules `layers`
    ({layer: module path under diffusion_model}) are recorded: per call its layer, sigma, cond
    indices and q, k as [batch, heads, tokens, head dim]. Use as a context manager (the module
    hooks sit on the shared modules and are removed on exit); apply the method to `clone` after."""

    def __init__(self, model, layers: dict):
        self.clone = model.clone()
        self.calls = []
        self._model = model
        self._layers = layers
        self._inside = inside = [None]
        calls = self.calls

        def record(func, *args, **kwargs):
            if inside[0] is not None:
                # optimized_attention(q, k, v, heads, mask, attn_precision, skip_reshape, ...): callers
                # pass the later ones by position or by name.
                q, k = args[0], args[1]
                heads = args[3] if len(args) > 3 else kwargs["heads"]
                skip = args[6] if len(args) > 6 else kwargs.get("skip_reshape", False)
                options = kwargs.get("transformer_options") or {}
                calls.append(dict(layer=inside[0], sigma=float(options["sigmas"].max()),
                                  conds=list(options.get("cond_or_uncond") or [0]),
                                  q=_heads_first(q, heads, skip), k=_heads_first(k, heads, skip)))
            return func(*args, **kwargs)
        # A plain function, not a bound method: ComfyUI deep-copies model_options on every clone.
        self.clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record

    def __enter__(self):
        dm = self._model.get_model_object("diffusion_model")
        self._handles = []
        for layer, path in self._layers.items():
            module = comfy.utils.get_attr(dm, path)
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter_layer, layer)))
            self._handles.append(module.register_forward_hook(self._leave_layer))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _enter_layer(self, layer, module, args):
        self._inside[0] = layer

    def _leave_layer(self, module, args, output):
        self._inside[0] = None

    def rows(self, cond: int) -> dict:
        """{(layer, sigma): [(q, k) of cond's rows, one pair per call that ran them]}."""
        out = {}
        for c in self.calls:
            if cond in c["conds"]:
                per = c["q"].shape[0] // len(c["conds"])
                i = c["conds"].index(cond) * per
                out.setdefault((c["layer"], c["sigma"]), []).append((c["q"][i:i + per], c["k"][i:i + per]))
        return out


def _heads_first(t, heads, skip_reshape):
    t = t.detach().float().clone()
    if skip_reshape:
        return t
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def step_sigmas(model, steps, scheduler="simple"):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return [float(s) for s in sigmas[:-1]]


def matched_calls(edited: dict, source: dict, conds, sigmas):
    """(cond, layer, sigma, target (q, k), source (q, k)) for every target call (rows of a cond in
    `conds`) at one of `sigmas`, paired with the source's own call there; `edited`, `source`:
    {cond: KernelRecorder.rows(cond)}. Fails where a (cond, layer, sigma) of the source has no
    target call."""
    for cond in conds:
        for (layer, sigma), refs in sorted(source[cond].items()):
            if sigma not in sigmas:
                continue
            assert len(refs) == 1
            assert (layer, sigma) in edited[cond], f"no target call for cond {cond} at layer {layer}, sigma {sigma:.4g}"
            for got in edited[cond][(layer, sigma)]:
                yield cond, layer, sigma, got, refs[0]


def assert_targets_take_the_source(edited, source, conds, sigmas, span=lambda tokens: slice(None)):
    """Every target call got, on its video tokens (span(tokens) of a call of that many tokens),
    the q and k the source has there in its own run (relative to the source's values)."""
    worst = {cond: 0.0 for cond in conds}
    for cond, _, _, got, ref in matched_calls(edited, source, conds, sigmas):
        for mine, want in zip(got, ref):
            mine, want = mine[:, :, span(mine.shape[2])], want[:, :, span(want.shape[2])]
            worst[cond] = max(worst[cond], float((mine - want).abs().max() / want.abs().max()))
    assert max(worst.values()) < NOISE, f"target q/k vs the source's, largest relative gap by cond index: {worst}"


# --- the families with text in self-attention -----------------------------------------------------
FAMILY_LAYERS = {
    "hunyuan_video": {0: "double_blocks.0", 1: "double_blocks.1", 2: "single_blocks.0", 3: "single_blocks.1"},
    "mochi": {0: "blocks.0.attn", 1: "blocks.1.attn"},
    "cogvideox": {0: "blocks.0", 1: "blocks.1"},
    "minimax_h3": {0: "blocks.0.attn", 1: "blocks.1.attn"},
}


def video_span(fam, model):
    """span(tokens): where the video tokens are in a joint (video and text) kernel call of `tokens` tokens."""
    video = FRAMES * (fam.size // 2) ** 2
    dm = model.get_model_object("diffusion_model")
    if fam.id == "hunyuan_video":
        # Up to 0.3.x the double blocks flip the streams (video first); newer ComfyUI dropped the flag: text first.
        first = bool(getattr(dm.double_blocks[0], "flipped_img_txt", False))
    else:
        first = fam.id == "mochi"  # Mochi: video then text; CogVideoX: text then video; MiniMax H3: video last
    return lambda tokens: slice(0, video) if first else slice(tokens - video, tokens)


def family_edit(fam_id, source_tokens, cfg, steps=2):
    """Plain sampling, a recorded plain run with the source prompt, and a recorded edit (ratio 1:
    every layer) of `fam_id`'s tiny model: {plain, result, source, edited}, the last two
    {cond: KernelRecorder.rows(cond)} over every self-attention layer. Once per module."""
    def compute():
        fam = BY_ID[fam_id]
        model = load(fam)
        latent = family_latent(fam)
        target, negative = conditioning(fam, 1, tokens=8), conditioning(fam, 2, tokens=8)
        source = conditioning(fam, 4, tokens=source_tokens)
        layers = FAMILY_LAYERS[fam_id]
        plain = ksample(model, latent, target, negative, steps=steps, cfg=cfg)
        with KernelRecorder(model, layers) as reference:
            ksample(reference.clone, latent, source, negative, steps=steps, cfg=cfg)
        with KernelRecorder(model, layers) as edited:
            result = ksample(apply_entropy_editing(edited.clone, source, ratio=1.0), latent, target, negative,
                             steps=steps, cfg=cfg)
        return dict(plain=plain, result=result, sigmas=step_sigmas(model, steps), span=video_span(fam, model),
                    source={c: reference.rows(c) for c in (0, 1)}, edited={c: edited.rows(c) for c in (0, 1)})
    return once(("family_edit", fam_id, source_tokens, cfg, steps), compute)


# --- 1. source and target in different forwards ---------------------------------------------------
@pytest.mark.parametrize("source_tokens,cfg", [
    pytest.param(8, 3.0, id="source_8_tokens-cfg3"),  # the control: source and target share forwards
    pytest.param(9, 1.0, id="source_9_tokens-cfg1"),
    pytest.param(9, 3.0, id="source_9_tokens-cfg3"),
])
def test_hunyuan_video_edits_cond_and_uncond_whatever_the_source_prompts_length(source_tokens, cfg):
    """HunyuanVideo keeps each prompt at its own length and ComfyUI batches only conds of the same
    shape, so a 9-token source never runs in the forward of an 8-token target. Every target call
    (cond, and uncond at CFG > 1) in every layer (ratio 1) and step must still get the source's
    video q and k, and the result must move away from plain sampling. The 8-token source (same
    forward) is the control. Measured on the broken code with 9 tokens: at CFG 1 the target's q/k
    differ from the source's by 1.06 (relative) and the result equals plain sampling (difference
    0.0); at CFG 3 the cond rows differ by 1.06, the uncond rows match (7e-7)."""
    run = family_edit("hunyuan_video", source_tokens, cfg)
    conds = (0,) if cfg == 1.0 else (0, 1)
    moved = relative_max(run["result"], run["plain"])
    assert_targets_take_the_source(run["edited"], run["source"], conds, run["sigmas"], run["span"])
    assert moved > EFFECT, f"the edit moved the result by {moved:.3g} only"


def wan_plain(model):
    return once("wan_plain", lambda: ksample(model, LATENT, TARGET, NEG, steps=STEPS))


def wan_edit(model):
    """The edit in one KSampler run, one forward per step (the reference of the Wan tests)."""
    return once("wan_edit", lambda: ksample(apply_entropy_editing(model, SOURCE), LATENT, TARGET, NEG, steps=STEPS))


def test_split_batches_edit_as_one_batch(wan21, monkeypatch):
    """Wan at CFG 5: target cond and uncond plus the source's two rows are 4 batch elements; with
    memory for 3, ComfyUI runs them in two forwards (the source's two rows, then the target's two).
    The edit must equal the edit made in one forward. Measured on the broken code: split vs
    one-forward edit 1.9e-2 (relative), split vs plain 0.0 (nothing edited), the edit itself moves
    the result by 1.9e-2. Memory for 1 or 2 elements failed the same way (split vs plain 8e-7, 0.0)."""
    plain, whole = wan_plain(wan21), wan_edit(wan21)
    batches = []
    counted = wan21.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_batch_sizes",
                                 lambda executor, x, *a, **kw: batches.append(x.shape[0]) or executor(x, *a, **kw))
    fit_only(monkeypatch, wan21, LATENT, 3)
    split = ksample(apply_entropy_editing(counted, SOURCE), LATENT, TARGET, NEG, steps=STEPS)
    assert batches and max(batches) <= 3, f"set-up: ComfyUI did not split the batch ({batches})"
    assert relative_max(whole, plain) > EFFECT
    assert relative_max(split, whole) < NOISE, (f"split edit vs one-forward edit {relative_max(split, whole):.3g}, "
                                                f"split edit vs plain {relative_max(split, plain):.3g}")


# --- 2. across sampler stages ---------------------------------------------------------------------
def advanced(model, latent, start, end, seed=0, steps=STEPS):
    """KSamplerAdvanced as a two-stage graph sets it: the stage that starts at step 0 adds the
    noise, a stage that ends before the last step returns the leftover noise."""
    return run_node(nodes.KSamplerAdvanced, model=model, add_noise="enable" if start == 0 else "disable",
                    noise_seed=seed, steps=steps, cfg=5.0, sampler_name="euler", scheduler="simple", positive=TARGET,
                    negative=NEG, latent_image=latent, start_at_step=start, end_at_step=end,
                    return_with_leftover_noise="enable" if end < steps else "disable")[0]


def two_stages(model, split):
    return advanced(model, advanced(model, LATENT, 0, split), split, STEPS)["samples"]


def test_two_ksampler_advanced_stages_equal_the_one_run_edit(wan21):
    """One edited model feeding two KSamplerAdvanced stages (steps 0-2 with leftover noise, then
    2-4 adding none: the Wan 2.2 two-expert pattern) must give the edit of one KSampler run over
    the 4 steps: the source continues its own trajectory into the second stage. Plain sampling
    gives the float noise of splitting the steps. Measured on the broken code: two stages vs one
    run 1.1e-2 (relative), plain two stages vs one run 5.9e-7, the edit itself moves the result by
    1.9e-2. Splits after step 1 and step 3 failed the same way (2.2e-2, 1.7e-2; plain 7.5e-7, 4.9e-7)."""
    plain, one_run = wan_plain(wan21), wan_edit(wan21)
    plain_split = relative_max(two_stages(wan21, 2), plain)
    staged = two_stages(apply_entropy_editing(wan21, SOURCE), 2)
    assert plain_split < NOISE / 10
    assert relative_max(one_run, plain) > EFFECT
    gap = relative_max(staged, one_run)
    assert gap < NOISE, f"two stages vs one run {gap:.3g} (plain: {plain_split:.3g})"


WAN_LAYERS = {i: f"blocks.{i}.self_attn" for i in range(4)}


def test_start_percent_takes_the_source_from_its_own_trajectory(wan21):
    """start_percent 0.45 with 4 steps (Wan's shifted schedule: the window opens at sigma 0.91, so
    steps 0 and 1, at sigma 1 and 0.96, are left alone and steps 2 and 3, at 0.89 and 0.73, edited).
    The right source at the first edited step is the latent its own trajectory (the source prompt
    from the same noise) has reached there, not the target's latent of that step: in every edited
    step the target's q and k in every layer (ratio 1) must be those of a plain run with the source
    prompt at that step. Measured on the broken code: they differ from the source's by 0.40
    (relative), cond and uncond."""
    start = 0.45
    sigmas = step_sigmas(wan21, STEPS)
    opens = float(wan21.get_model_object("model_sampling").percent_to_sigma(start))
    edited_steps = [s for s in sigmas if s <= opens]
    assert len(edited_steps) == 2, f"set-up: the window opens at {opens:.3g}, steps at {sigmas}"
    with KernelRecorder(wan21, WAN_LAYERS) as reference:
        ksample(reference.clone, LATENT, SOURCE, NEG, steps=STEPS)
    with KernelRecorder(wan21, WAN_LAYERS) as edited:
        model = apply_entropy_editing(edited.clone, SOURCE, ratio=1.0, start_percent=start)
        ksample(model, LATENT, TARGET, NEG, steps=STEPS)
    assert_targets_take_the_source({c: edited.rows(c) for c in (0, 1)}, {c: reference.rows(c) for c in (0, 1)},
                                   (0, 1), edited_steps)


def test_real_video_second_stage_continues_from_its_input(wan21):
    """A real source video (source_latent): its inversion replaces the sampler's start where the
    run begins; a later KSamplerAdvanced stage must continue from the latent it is given. Measured
    on the broken code: stage 2 from stage 1's latent and from random numbers give the same output
    (relative difference 8.7e-7, float noise)."""
    video = {"samples": ksample(wan21, LATENT, SOURCE, NEG, steps=STEPS, cfg=1.0, seed=7)}
    edited = apply_entropy_editing(wan21, SOURCE, video)
    handover = advanced(edited, LATENT, 0, 2)
    continued = advanced(edited, handover, 2, STEPS)["samples"]
    noise = torch.randn(handover["samples"].shape, generator=torch.Generator().manual_seed(11))
    from_noise = advanced(edited, {"samples": noise}, 2, STEPS)["samples"]
    assert torch.isfinite(continued).all()
    assert relative_max(from_noise, continued) > 0.1, f"stage 2 ignores its input ({relative_max(from_noise, continued):.3g})"


# --- 3. context windows ---------------------------------------------------------------------------
ORDERS = ["context windows before editing", "context windows after editing"]


def context_windows(model, length):
    try:
        node = importlib.import_module("comfy_extras.nodes_context_windows").ContextWindowsManualNode
    except (ImportError, AttributeError):
        pytest.skip("this ComfyUI has no ContextWindowsManual node (comfy_extras/nodes_context_windows.py)")
    import comfy.context_windows as cw
    return run_node(node, model=model, context_length=length, context_overlap=1,
                    context_schedule=cw.ContextSchedules.STATIC_STANDARD, context_stride=1, closed_loop=False,
                    fuse_method=cw.ContextFuseMethods.PYRAMID, dim=2)[0]


def windowed_edit(model, source, order, length):
    if order == ORDERS[0]:
        return apply_entropy_editing(context_windows(model, length), source)
    return context_windows(apply_entropy_editing(model, source), length)


@pytest.mark.parametrize("order", ORDERS)
def test_context_windows_edit(wan21, order):
    """ComfyUI's context windows node, 3 of the latent's 5 frames per window (windows 0-2 and
    2-4), in either node order: the source branch must be cut to each window as the target is. By
    value: with the source prompt as the target, the edit is plain sampling with the same windows
    (the source follows the sampler's windowed trajectory); another target prompt is edited (moved
    away from plain windowed sampling); a window covering the whole clip is the edit without
    windows. Measured on the broken code: RuntimeError (shape mismatch, [16, 5, 8, 8] into
    [1, 16, 3, 8, 8]) at the first step, both orders."""
    def plain_windows(prompt):
        return once(("plain_windows", id(prompt)),
                    lambda: ksample(context_windows(wan21, 3), LATENT, prompt, NEG, steps=STEPS))
    same = ksample(windowed_edit(wan21, SOURCE, order, 3), LATENT, SOURCE, NEG, steps=STEPS)
    gap = relative_max(same, plain_windows(SOURCE))
    assert gap < 1e-3, f"equal prompts vs plain sampling, both with windows: {gap:.3g}"
    edited = ksample(windowed_edit(wan21, SOURCE, order, 3), LATENT, TARGET, NEG, steps=STEPS)
    assert relative_max(edited, plain_windows(TARGET)) > EFFECT
    whole = ksample(windowed_edit(wan21, SOURCE, order, 5), LATENT, TARGET, NEG, steps=STEPS)
    assert relative_max(whole, wan_edit(wan21)) < NOISE


# --- 6. joint attention: the map over video and text keys ------------------------------------------
@pytest.mark.families
@pytest.mark.parametrize("fam_id,layer", [
    pytest.param("hunyuan_video", 1, id="hunyuan_video_double_block"),
    pytest.param("hunyuan_video", 2, id="hunyuan_video_single_block"),
    pytest.param("mochi", 1, id="mochi"),
    pytest.param("cogvideox", 1, id="cogvideox"),
    pytest.param("minimax_h3", 1, id="minimax_h3"),
])
def test_joint_attention_video_rows_take_the_sources_map(fam_id, layer):
    """Families that attend over video and text tokens together: the map the edit must take from
    the source (paper: the target's attention map is the source's) is the softmax of the video
    queries over every key, video and text. In a chosen layer (ratio 1), at every step and for cond
    and uncond, the target's video rows of softmax(q k^T / sqrt(d)) must equal the source's in its
    own run. Measured on the broken code: largest difference of a probability 0.30 (HunyuanVideo
    double block), 0.15 (single block), 0.30 (Mochi), 0.23 (CogVideoX, ComfyUI 0.33)."""
    if fam_id in ("cogvideox", "minimax_h3"):
        load(BY_ID[fam_id])  # skips where this ComfyUI has no CogVideoX / MiniMax H3
    run = family_edit(fam_id, 8, 3.0)
    worst, checked = 0.0, 0
    for cond, at, _, (q, k), (ref_q, ref_k) in matched_calls(run["edited"], run["source"], (0, 1), run["sigmas"]):
        if at != layer:
            continue
        assert q.shape == ref_q.shape and k.shape == ref_k.shape
        span = run["span"](q.shape[2])
        gap = _softmax_rows(q[:, :, span], k) - _softmax_rows(ref_q[:, :, span], ref_k)
        worst = max(worst, float(gap.abs().max()))
        checked += 1
    assert checked >= 2 * len(run["sigmas"])
    assert worst < 1e-4, f"the target's video rows over all keys differ from the source's by {worst:.3g}"


def _softmax_rows(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
