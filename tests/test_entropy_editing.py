"""IE-Adapt video editing through ComfyUI's real patcher and samplers, on tiny models."""

import math

import comfy.patcher_extension
import pytest
import torch

from freevideo.enhance_core.patching.layer_routing import SelfAttentionLayers
from freevideo.enhance_core.methods.entropy_editing import EntropyEditing, apply_entropy_editing
from freevideo.enhance_core.models import adapter_for
from support.families import FAMILIES, conditioning, flat, load, latent as family_latent
from support.sampling import ksample, relative_l2, text_conditioning, video_latent

TARGET, SOURCE, NEG = text_conditioning(seed=1), text_conditioning(seed=3), text_conditioning(seed=2)


def sample(model, positive=TARGET, cfg=5.0, steps=3, **kw):
    return ksample(model, video_latent(frames=5), positive, NEG, steps=steps, cfg=cfg, **kw)


def test_ratio_zero_is_plain_sampling_and_the_input_model_is_untouched(wan21):
    before = sample(wan21)
    assert torch.equal(sample(apply_entropy_editing(wan21, SOURCE, ratio=0.0)), before)
    edited = sample(apply_entropy_editing(wan21, SOURCE))
    assert not torch.equal(edited, before)
    assert torch.equal(sample(wan21), before)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_equal_prompts_reproduce_the_generated_source(wan21, cfg):
    """Source prompt = target prompt: the source branch follows the sampler's own trajectory, so the
    edit is the plain result (up to the float noise of running in a larger batch)."""
    plain = sample(wan21, positive=SOURCE, cfg=cfg)
    edited = sample(apply_entropy_editing(wan21, SOURCE, ratio=0.5), positive=SOURCE, cfg=cfg)
    other = sample(apply_entropy_editing(wan21, SOURCE, ratio=0.5), positive=TARGET, cfg=cfg)
    gap = float((edited - plain).abs().max())
    assert gap < 1e-3 * float(plain.abs().max()), gap
    assert float((other - plain).abs().max()) > 100 * gap  # a different target prompt does edit


def _naive_entropy(q, k):
    """Mean normalised softmax entropy, q, k [B, L, H, D]."""
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / math.sqrt(q.shape[-1]), dim=-1)
    return float((-(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(p.shape[-1])).mean())


def test_lowest_entropy_layers_take_the_sources_q_and_k(wan21):
    calls = []

    def record(call):
        # Installed after the editing: outermost, it sees the q and k the editing receives.
        calls.append((call.layer, list(call.options["cond_or_uncond"]), call.q.clone(), call.k.clone(), call.heads))
        return call.run()
    inner = []

    def record_inner(call):
        inner.append((call.layer, list(call.options["cond_or_uncond"]), call.q.clone(), call.k.clone()))
        return call.run()
    # A recorder inside the editing needs to be installed before it: on a fresh clone, then edit it.
    base = wan21.clone()
    SelfAttentionLayers(base, adapter_for(base), "test_inner", "test").route(range(4), record_inner)
    editing = EntropyEditing(base, SOURCE, ratio=0.5)
    model = base.clone()
    SelfAttentionLayers(model, adapter_for(model), "test_outer", "test").route(range(4), record)
    sample(model, steps=1)
    # First forward: the source alone (conds 2, 3), measured; the choice = the lowest-entropy half.
    # (ComfyUI orders a call's conds as it likes: rows are found by cond index.)
    first = [c for c in calls if sorted(c[1]) == [2, 3]][:4]

    def element(call, cond):
        groups, q = call[1], call[2]
        per = q.shape[0] // len(groups)
        return slice(groups.index(cond) * per, (groups.index(cond) + 1) * per)
    entropies = {}
    for call in first:
        layer, _, q, k, heads = call
        rows = element(call, 2)  # the source's conditional element
        entropies[layer] = _naive_entropy(q[rows].view(1, q.shape[1], heads, -1), k[rows].view(1, k.shape[1], heads, -1))
    expected = sorted(sorted(entropies, key=entropies.get)[:2])
    assert sorted(editing.last_run.entropies) == [0, 1, 2, 3]
    for layer, e in entropies.items():
        assert editing.last_run.entropies[layer] == pytest.approx(e, abs=1e-4)
    # Second forward: target cond/uncond (0, 1) with source cond/uncond (2, 3) in one batch.
    joint_outer = [c for c in calls if sorted(c[1]) == [0, 1, 2, 3]]
    joint_inner = [c for c in inner if sorted(c[1]) == [0, 1, 2, 3]]
    assert len(joint_outer) == len(joint_inner) == 4
    for outer, (_, _, q_in, k_in) in zip(joint_outer, joint_inner):
        layer, _, q, k, _ = outer
        e = lambda c: element(outer, c)  # noqa: E731
        if layer in expected:
            for t, s in ((0, 2), (1, 3)):  # target cond <- source cond, uncond <- uncond
                assert torch.equal(q_in[e(t)], q[e(s)]) and torch.equal(k_in[e(t)], k[e(s)])
        else:
            assert torch.equal(q_in, q) and torch.equal(k_in, k)
        for s in (2, 3):  # the source elements are never changed
            assert torch.equal(q_in[e(s)], q[e(s)])
    # The replacement is visible: past the first block the target's own q differs from the source's.
    assert any(not torch.equal(c[2][element(c, 0)], c[2][element(c, 2)]) for c in joint_outer)
    # Nothing of the run survives it: the run's holder is gone from the model's options.
    assert not any(key.endswith("/run") for key in model.model_options.get("transformer_options", {}))


def test_real_video_with_equal_prompts_is_reconstructed_within_the_inversions_error(wan21):
    """A real video: the node DDIM-inverts it and the target starts from the inverted latent, so with
    the source prompt as the target the video comes back, up to the first-order inversion's error,
    which falls with the step count (CFG 1: inversion and sampling see the same prediction). Another
    seed's video, for scale, is at a relative distance of about 1.2."""
    errors = {}
    for steps in (3, 20):
        source = ksample(wan21, video_latent(frames=5), SOURCE, NEG, steps=steps, cfg=1.0, seed=7)
        edited = ksample(apply_entropy_editing(wan21, SOURCE, {"samples": source}, 0.5), video_latent(frames=5),
                         SOURCE, NEG, steps=steps, cfg=1.0, seed=0)
        errors[steps] = relative_l2(edited, source)
    other = ksample(wan21, video_latent(frames=5), SOURCE, NEG, steps=20, cfg=1.0, seed=0)
    assert errors[20] < 0.1 and errors[20] < errors[3] / 2, errors  # measured: 0.068 and 0.34
    assert relative_l2(other, source) > 1.0
    # A different target prompt edits the inverted video: it moves away from it, less than a new video.
    edited = ksample(apply_entropy_editing(wan21, SOURCE, {"samples": source}, 0.5), video_latent(frames=5),
                     TARGET, NEG, steps=20, cfg=1.0, seed=0)
    assert errors[20] * 2 < relative_l2(edited, source) < relative_l2(other, source)


@pytest.mark.parametrize("case,message", [
    (dict(ratio=1.5), "ratio"),
    (dict(source_latent={"samples": torch.zeros(1, 16, 8, 8)}), "source_latent"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
])
def test_bad_input_is_a_clear_error(wan21, case, message):
    with pytest.raises(ValueError, match=message):
        apply_entropy_editing(wan21, SOURCE, **case)


@pytest.mark.families
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_every_family_edits(fam):
    model = load(fam)
    latent = family_latent(fam)
    plain = ksample(model, latent, conditioning(fam, 1), conditioning(fam, 2), steps=2, cfg=3.0)
    edited = ksample(apply_entropy_editing(model, conditioning(fam, 4)), latent, conditioning(fam, 1), conditioning(fam, 2), steps=2, cfg=3.0)
    assert torch.isfinite(flat(edited)).all() and not torch.equal(flat(edited), flat(plain))
    # A real video: the target starts from its inversion, whatever the family's noise scaling, so
    # the sampler's seed no longer matters.
    real = [flat(ksample(apply_entropy_editing(model, conditioning(fam, 4), {"samples": plain}), latent,
                         conditioning(fam, 1), conditioning(fam, 2), steps=2, cfg=3.0, seed=seed)) for seed in (0, 1)]
    assert torch.isfinite(real[0]).all() and torch.equal(real[0], real[1])
    assert not torch.equal(real[0], flat(edited))


def test_inspector_names_the_layers_editing_chooses(wan21):
    from freevideo.enhance_core.methods.attention_inspector import inspect_attention
    edited = wan21.clone()
    editing = EntropyEditing(edited, SOURCE, ratio=0.5)
    sample(edited, steps=1)
    sigma = float(wan21.get_model_object("model_sampling").sigma_max)
    report = inspect_attention(wan21, video_latent(frames=5), SOURCE, sigma)
    chosen = sorted(sorted(editing.last_run.entropies, key=editing.last_run.entropies.get)[:2])
    assert report.lowest(0.5) == chosen
    assert f"replaces layers: {', '.join(map(str, chosen))}" in report.table()


def test_a_source_video_of_another_size_fails_before_the_first_step(wan21):
    calls = []
    model = apply_entropy_editing(wan21, SOURCE, {"samples": torch.zeros(1, 16, 3, 8, 8)})
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count",
                               lambda executor, *a, **kw: calls.append(1) or executor(*a, **kw))
    with pytest.raises(ValueError, match=r"source_latent: shape \(1, 16, 3, 8, 8\) does not match the sampled latent"):
        sample(model)
    assert not calls  # no model call ran


def _stage(model, latent, start, end, steps=4):
    """KSamplerAdvanced as a two-stage graph sets it (noise added by the first, leftover noise returned
    by a stage that ends early)."""
    import nodes
    return nodes.KSamplerAdvanced().sample(model, "enable" if start == 0 else "disable", 0, steps, 5.0, "euler", "simple",
                                           TARGET, NEG, latent, start, end,
                                           "enable" if end < steps else "disable")[0]


def test_two_editing_nodes_in_two_stages_hand_the_source_on(wan21, caplog):
    """Wan 2.2's two-expert pattern: an editing node on each stage's model (here both on one model,
    every layer chosen so the second node's own choice is the first's). The second node continues
    the source's trajectory from the latent the first stage returned, so the two stages give the
    edit of one run; a second stage fed another latent says in the log that its source starts from
    the target's latent."""
    one_run = sample(apply_entropy_editing(wan21, SOURCE, ratio=1.0), steps=4)
    handover = _stage(apply_entropy_editing(wan21, SOURCE, ratio=1.0), video_latent(frames=5), 0, 2)
    second = apply_entropy_editing(wan21, SOURCE, ratio=1.0)
    staged = _stage(second, handover, 2, 4)["samples"]
    plain = sample(wan21, steps=4)
    gap = float((staged - one_run).abs().max() / one_run.abs().max())
    assert gap < 1e-4, gap
    assert float((one_run - plain).abs().max() / plain.abs().max()) > 1e-2
    caplog.clear()
    _stage(second, {"samples": handover["samples"] + 0.1}, 2, 4)
    assert "the source starts from the target's latent" in caplog.text


@pytest.fixture(scope="module")
def two_entry_edit(wan21):
    """A two-entry positive (ConditioningCombine: ComfyUI runs each entry as its own batch element)
    edited with every element in one forward: target c0, c1, n0 and the source's cond and uncond."""
    import nodes
    positive = nodes.ConditioningCombine().combine(TARGET, text_conditioning(seed=5))[0]
    return positive, sample(apply_entropy_editing(wan21, SOURCE), positive=positive), sample(wan21, positive=positive)


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_a_two_entry_positive_is_edited_alike_under_every_batch_split(wan21, two_entry_edit, capacity, monkeypatch):
    """Memory for `capacity` of the 5 elements: ComfyUI runs the source's elements in forwards of
    their own and each target entry takes the source's q and k kept from them (both entries pair
    with the source's one entry). The result equals the one-forward edit."""
    import comfy.model_management
    import comfy.model_patcher
    positive, unsplit, plain = two_entry_edit
    latent = video_latent(frames=5)
    free = 1.5 * wan21.model.memory_required([1] + list(latent["samples"].shape[1:])) * (capacity + 0.5)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: free)
    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda *a, **k: free)
    batches = []
    counted = wan21.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_batch_sizes",
                                 lambda executor, x, *a, **kw: batches.append(x.shape[0]) or executor(x, *a, **kw))
    split = sample(apply_entropy_editing(counted, SOURCE), positive=positive)
    assert batches and max(batches) <= capacity, batches
    assert float((unsplit - plain).abs().max() / plain.abs().max()) > 1e-2
    gap = float((split - unsplit).abs().max() / unsplit.abs().max())
    assert gap < 1e-4, f"memory for {capacity} of 5 elements: {gap:.3g} from the one-forward edit"


def test_multigpu_work_units_edit_as_one_device(wan21, monkeypatch):
    """0.33's MultiGPU_WorkUnits node and thread pool, two CPU devices standing in for two GPUs:
    ComfyUI deals the 4 elements (target cond and uncond, the source's two) to the devices, which run
    at once, so a target may run before its source; such a target is evaluated again with the
    source's q and k stored. The result equals the one-device edit."""
    from support.deep_clones import forget_released_patchers, two_cpu_devices_work_units
    one_device = sample(apply_entropy_editing(wan21, SOURCE))
    MultiGPUCFGSplitNode = two_cpu_devices_work_units(monkeypatch)
    forget_released_patchers()
    split = sample(MultiGPUCFGSplitNode.execute(apply_entropy_editing(wan21, SOURCE), 2)[0])
    gap = float((split - one_device).abs().max() / one_device.abs().max())
    assert gap < 1e-4, f"two devices vs one: {gap:.3g}"
