"""IE-Adapt guidance and the attention inspector through ComfyUI's real patcher and samplers, on tiny Wan 2.1."""

import logging

import pytest
import torch
from einops import rearrange

import comfy.sample
import comfy.samplers
from freevideo.enhance_core.patching.attention_slot import add_attention_override
from freevideo.enhance_core.patching.layer_routing import SelfAttentionLayers
from freevideo.enhance_core.methods.attention_inspector import inspect_attention, render_chart
from freevideo.enhance_core.methods.entropy_guidance import PAIRS, EntropyGuidance, apply_entropy_guidance
from freevideo.enhance_core.models import adapter_for
from support.families import FAMILIES, conditioning, flat, load, latent as family_latent
from support.reference import naive_entropy
from support.sampling import force_unbatched, ksample, text_conditioning, video_latent

POS, NEG = text_conditioning(seed=1), text_conditioning(seed=2)
LOG = "freevideo.enhance_core.methods.entropy_guidance"


def first_denoised(model, cfg=4.0, steps=1, seed=0, positive=POS, negative=NEG):
    """The denoised prediction of the first step of a real ComfyUI sampling run (sampler callback)."""
    latent = comfy.sample.fix_empty_latent_channels(model, video_latent(frames=5)["samples"])
    noise = comfy.sample.prepare_noise(latent, seed)
    seen = []
    comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                        callback=lambda i, x0, x, total: seen.append(x0.clone()), disable_pbar=True, seed=seed)
    return seen[0]


def perturbed(model, layers, kind):
    """An independent identity / uniform replacement (Wan's kernel layout: [B, L, H*D])."""
    m = model.clone()

    def replace(call):
        v = call.v
        return v.clone() if kind == "identity" else v.mean(dim=1, keepdim=True).expand_as(v).clone()
    SelfAttentionLayers(m, adapter_for(m), "test_perturbation", "test perturbation").route(layers, replace)
    return m


def recorder(model):
    """A clone whose every attention kernel call (outermost: it sees the final output) is recorded."""
    m = model.clone()
    calls = []

    def record(call_next, q, k, v, heads, **kwargs):
        out = call_next(q, k, v, heads, **kwargs)
        calls.append(dict(q=q, k=k, v=v, out=out, heads=heads, groups=list(kwargs["transformer_options"]["cond_or_uncond"])))
        return out
    add_attention_override(m, "test_recorder", record)
    return m, calls


def element(call, group):
    """Batch element of cond index `group` in a recorded call."""
    i = call["groups"].index(group)
    per = call["q"].shape[0] // len(call["groups"])
    return {key: call[key][i * per:(i + 1) * per] for key in ("q", "k", "v", "out")}


def sdpa(q, k, v, heads):
    b, n, _ = q.shape
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    return torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, -1)


def high_entropy_at(model, layer):
    """A clone whose layer `layer` attends almost uniformly: its QK-norm scale is shrunk to 0.02."""
    m = model.clone()
    key = f"diffusion_model.blocks.{layer}.self_attn.norm_q.weight"
    m.add_patches({key: (torch.full_like(m.get_model_object(key), 0.02),)}, 1.0, 0.0)
    return m


def naive_uniform(v, n_queries, mask=None):
    """The uniform map's output, one query and one key at a time: every query gets the mean of the
    values of the keys its mask row allows; an additive mask weights key j by exp(mask_j) / sum exp."""
    import math
    b, h, lk, d = v.shape
    out = torch.zeros(b, h, n_queries, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n_queries):
                if mask is None:
                    w = [1.0] * lk
                else:
                    m = {2: mask[None, None], 3: mask[:, None], 4: mask}[mask.ndim]  # [Lq, Lk], [B, Lq, Lk], 4-D
                    row = m[bi if m.shape[0] > 1 else 0, hi if m.shape[1] > 1 else 0, i if m.shape[2] > 1 else 0]
                    w = [float(bool(x)) for x in row] if mask.dtype == torch.bool else \
                        [math.exp(float(x)) if float(x) > -1e30 else 0.0 for x in row]
                total = sum(w)
                for j in range(lk):
                    out[bi, hi, i] += w[j] / total * v[bi, hi, j].double()
    return out.float()


def test_uniform_branch_is_the_masked_mean_of_v():
    from freevideo.enhance_core.methods.entropy_guidance import replaced_attention
    g = torch.Generator().manual_seed(4)
    v = torch.randn(2, 2, 6, 3, generator=g)
    keep = torch.rand(2, 5, 6, generator=g) > 0.4
    keep[..., 2] = True  # every row keeps a key
    additive = torch.randn(2, 1, 5, 6, generator=g).masked_fill(~keep.unsqueeze(1), float("-inf"))
    padding = torch.zeros(2, 1, 1, 6)
    padding[1, ..., 4:] = -torch.finfo(torch.float32).max  # padded keys of the second element
    for mask in (None, keep, additive, padding, keep[0]):
        torch.testing.assert_close(replaced_attention("uniform", v, 5, mask), naive_uniform(v, 5, mask), rtol=1e-5, atol=1e-6)
    plain = replaced_attention("uniform", v, 5)
    torch.testing.assert_close(plain[:, :, 3], v.mean(dim=2), rtol=1e-6, atol=1e-6)
    assert torch.equal(replaced_attention("identity", v, 6), v)


def test_branches_replace_exactly_the_registered_layer(wan21, monkeypatch):
    """One real step, (uniform, identity) on layer 1: cond, uncond and both branches run as one batch of 4.
    Layer 1 outputs exactly V (identity) and mean(V) (uniform) for the branch elements; every other
    kernel call of every element is plain attention on its own inputs; cond and uncond match an
    unperturbed run. (Blocks shared with the cond are not skipped here, to see every element.)"""
    from freevideo.enhance_core.models.wan import WanAdapter
    monkeypatch.setattr(WanAdapter, "prefix_blocks", None)
    guided, calls = recorder(apply_entropy_guidance(wan21, 2.0, layers="1"))
    plain, plain_calls = recorder(wan21)
    ksample(guided, video_latent(), POS, NEG, steps=1, cfg=4.0)
    ksample(plain, video_latent(), POS, NEG, steps=1, cfg=4.0)
    assert len(calls) == len(plain_calls) == 8, "one forward: 4 blocks x (self, cross)"
    assert sorted(calls[0]["groups"]) == [0, 1, 2, 3]
    uniform, identity = 2, 3
    for i, (call, ref) in enumerate(zip(calls, plain_calls)):
        self_attn, block = i % 2 == 0, i // 2
        for group in (0, 1):  # cond and uncond: untouched everywhere
            torch.testing.assert_close(element(call, group)["out"], element(ref, group)["out"], rtol=1e-5, atol=1e-5)
        for group in (uniform, identity):
            e = element(call, group)
            if self_attn and block == 1:
                if group == identity:
                    assert torch.equal(e["out"], e["v"])
                else:
                    torch.testing.assert_close(e["out"], e["v"].mean(dim=1, keepdim=True).expand_as(e["v"]), rtol=0, atol=1e-6)
                continue
            torch.testing.assert_close(e["out"], sdpa(e["q"], e["k"], e["v"], call["heads"]), rtol=1e-5, atol=1e-5)
            if block < 1:  # before the registered layer a branch is a copy of the conditional pass
                torch.testing.assert_close(e["out"], element(ref, 0)["out"], rtol=1e-5, atol=1e-5)
            elif self_attn:
                assert not torch.allclose(e["out"], element(ref, 0)["out"], atol=1e-3), "the perturbation propagates"


@pytest.mark.parametrize("pair,layers,cfg", [
    (("uniform", "identity"), "auto", 4.0),
    (("original", "identity"), "2", 4.0),
    (("uniform", "original"), "1, 3", 4.0),
    (("uniform", "identity"), "2", 1.0),  # distilled models: CFG 1, no unconditional pass
])
def test_guided_prediction_equals_the_formula(wan21, pair, layers, cfg):
    """guided = e_u + s (e_c - e_u) + lambda (e_pos - e_neg) with each term from its own run."""
    lam = 1.5
    g = EntropyGuidance(model := wan21.clone(), lam, *pair, layers=layers)
    guided = first_denoised(model, cfg=cfg)
    registered = g.last_run.registered
    assert registered == ([int(x) for x in layers.split(",")] if layers != "auto" else registered) and len(registered) >= 1
    e = {"original": first_denoised(wan21, cfg=1.0)}
    e_u = first_denoised(wan21, cfg=1.0, positive=NEG)
    for kind in set(pair) - {"original"}:
        e[kind] = first_denoised(perturbed(wan21, registered, kind), cfg=1.0)
    cfg_part = e["original"] if cfg == 1.0 else e_u + cfg * (e["original"] - e_u)
    want = cfg_part + lam * (e[pair[0]] - e[pair[1]])
    assert (want - cfg_part).abs().max() > 0.05, "the guidance term must be visible for the test to mean something"
    torch.testing.assert_close(guided, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", [0, 3])
def test_registry_picks_the_high_entropy_layer(wan21, target, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    g = EntropyGuidance(model := high_entropy_at(wan21, target).clone(), 1.0, top_k=1)
    ksample(model, video_latent(), POS, NEG, steps=1, cfg=4.0)
    assert g.last_run.registered == [target]
    assert g.last_run.entropies[target] > 0.99 and all(v < 0.97 for layer, v in g.last_run.entropies.items() if layer != target)
    assert f"layer(s) {target} ({g.last_run.entropies[target]:.3f}) [top 1 of 4 by entropy]" in caplog.text
    # The inspector shows the same choice, at the first step's sigma, with the same noise.
    report = inspect_attention(high_entropy_at(wan21, target), video_latent(), POS, sigma=1.0, seed=0)
    assert report.top == [target]
    assert report.entropy[target] == pytest.approx(g.last_run.entropies[target], abs=1e-3)


def test_registry_is_redone_each_sampling_run(wan21):
    g = EntropyGuidance(model := wan21.clone(), 1.0, top_k=2)
    ksample(model, video_latent(), POS, NEG, steps=1)
    g.last_run.registered = [0]  # stale state from a previous run must not survive the next one
    first = dict(g.last_run.entropies)
    ksample(model, video_latent(), POS, NEG, steps=1)
    assert len(g.last_run.registered) == 2 and g.last_run.entropies == first


def test_batched_and_unbatched_branches_give_the_same_result(wan21, monkeypatch):
    guided, calls = recorder(apply_entropy_guidance(wan21, 2.0, layers="2"))
    batched = ksample(guided, video_latent(), POS, NEG, steps=1)
    assert max(c["q"].shape[0] for c in calls) == 4
    calls.clear()
    force_unbatched(monkeypatch)
    separate = ksample(guided, video_latent(), POS, NEG, steps=1)
    assert max(c["q"].shape[0] for c in calls) == 1
    torch.testing.assert_close(separate, batched, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched, ksample(wan21, video_latent(), POS, NEG, steps=1), atol=1e-2)


def test_other_calc_functions_and_overrides_compose(wan21):
    """A calc_cond_batch function set after the node (it replaces ours: branches then run in the post-CFG
    function) or before it (ours calls it), and an attention override installed before ours (the kernel
    then gets the whole batch): all give the same guided prediction."""
    def plain_calc(args):
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])
    reference = first_denoised(apply_entropy_guidance(wan21, 2.0, layers="1"))
    after = apply_entropy_guidance(wan21, 2.0, layers="1")
    after.set_model_sampler_calc_cond_batch_function(plain_calc)
    before = wan21.clone()
    before.set_model_sampler_calc_cond_batch_function(plain_calc)
    inner_override = wan21.clone()
    add_attention_override(inner_override, "test_recorder", lambda call_next, *a, **kw: call_next(*a, **kw))
    for model in (after, apply_entropy_guidance(before, 2.0, layers="1"), apply_entropy_guidance(inner_override, 2.0, layers="1")):
        torch.testing.assert_close(first_denoised(model), reference, rtol=1e-4, atol=1e-4)


def test_input_model_untouched_and_off_settings_bit_identical(wan21):
    before = ksample(wan21, video_latent(), POS, NEG, steps=1)
    assert not torch.equal(ksample(apply_entropy_guidance(wan21, 2.0), video_latent(), POS, NEG, steps=1), before)
    assert torch.equal(ksample(wan21, video_latent(), POS, NEG, steps=1), before)
    assert torch.equal(ksample(apply_entropy_guidance(wan21, 0.0), video_latent(), POS, NEG, steps=1), before)
    outside = apply_entropy_guidance(wan21, 2.0, start_percent=1.0, end_percent=1.0)
    assert torch.equal(ksample(outside, video_latent(), POS, NEG, steps=1), before)


@pytest.mark.parametrize("kwargs,message", [
    (dict(positive="identity", negative="identity"), "both 'identity'"),
    (dict(positive="identity", negative="uniform"), "lower quality.*uniform / identity"),
    (dict(positive="blur"), "positive_branch: 'blur'"),
    (dict(layers="x"), "layers: cannot read 'x'"),
    (dict(layers="2-9"), "layers: layer 9 does not exist"),
    (dict(layers=" "), "layers: empty"),
    (dict(top_k=5), "top_k: 5; this model has 4 self-attention layers"),
    (dict(scale=-1.0), "scale: -1.0 is negative"),
    (dict(entropy_rows=-1), "entropy_rows"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
])
def test_bad_input_is_rejected_before_sampling(wan21, kwargs, message):
    args = dict(scale=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        apply_entropy_guidance(wan21, **args)


def test_unsupported_model_names_the_supported_families():
    import comfy.model_base
    import comfy.model_patcher
    base = comfy.model_base.BaseModel.__new__(comfy.model_base.BaseModel)
    torch.nn.Module.__init__(base)
    base.diffusion_model = torch.nn.Linear(1, 1)
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="Supported families: Wan"):
        apply_entropy_guidance(patcher, 1.0)
    with pytest.raises(ValueError, match="Supported families: Wan"):
        inspect_attention(patcher, video_latent(), POS, 1.0)


def naive_cfi(q, k, frames):
    qf = rearrange(q.float(), "b (f s) h d -> b s h f d", f=frames)
    kf = rearrange(k.float(), "b (f s) h d -> b s h f d", f=frames)
    attn = (qf @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return attn[..., ~torch.eye(frames, dtype=torch.bool)].mean()


def test_inspector_reports_every_layer_exactly(wan21):
    model, calls = recorder(wan21)
    report = inspect_attention(model, video_latent(frames=5), POS, sigma=0.7, seed=3, entropy_rows=0, top_k=2)
    self_calls = calls[0::2]
    assert len(self_calls) == 4 and all(c["q"].shape[0] == 1 for c in self_calls), "one conditional evaluation"
    for layer, c in enumerate(self_calls):
        b, n, _ = c["q"].shape
        q, k = (t.view(b, n, c["heads"], -1) for t in (c["q"], c["k"]))
        assert report.entropy[layer] == pytest.approx(float(naive_entropy(q.transpose(1, 2), k.transpose(1, 2)).mean()), abs=1e-5)
        assert report.cfi[layer] == pytest.approx(float(naive_cfi(q, k, 5)), abs=1e-5)
    assert report.top == sorted(sorted(range(4), key=lambda i: -report.entropy[i])[:2])
    image = render_chart(report)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() and image.max() <= 1
    assert "<- registered" in report.table()
    one_frame = inspect_attention(wan21, video_latent(frames=1), POS, sigma=0.7)
    assert one_frame.cfi == [None] * 4 and render_chart(one_frame).shape[-1] == 3


def slg_parsed(model, double: str, single: str) -> tuple[list[int], list[int]]:
    """The block numbers ComfyUI's own SkipLayerGuidanceDiT reads from its two layer inputs (as its
    post-CFG function holds them)."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT
    out = SkipLayerGuidanceDiT.execute(model, scale=3.0, start_percent=0.0, end_percent=1.0,
                                       double_layers=double, single_layers=single)
    patched = out.result[0] if hasattr(out, "result") else out[0]
    (fn,) = patched.model_options["sampler_post_cfg_function"]
    held = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))
    return held["double_layers"], held["single_layers"]


@pytest.mark.parametrize("top_k", [1, 3])
def test_inspector_layer_lists_are_the_top_k_and_both_parsers_read_them(wan21, top_k):
    """The node's layer list is the top_k of the report's own entropies (highest first, ties to the
    lower index), reads back as the same layers with our parser and with SkipLayerGuidanceDiT's, and on
    Wan every layer is the ("double_block", i) block SLG skips."""
    from freevideo.enhance_core.patching.layer_lists import parse_layer_list
    from freevideo.nodes.attention_inspector import AttentionInspector
    report = inspect_attention(wan21, video_latent(frames=5), POS, sigma=1.0, seed=3, top_k=top_k)
    _, table, layers, double, single = AttentionInspector.execute(wan21, video_latent(frames=5), POS, 1.0, 3, top_k, 0).result
    want = sorted(sorted(range(4), key=lambda i: (-report.entropy[i], i))[:top_k])
    assert layers == ", ".join(map(str, want)) and double == layers and single == ""
    assert parse_layer_list(layers, 4, "layers") == want
    assert slg_parsed(wan21, double, single) == (want, [])
    assert report.blocks == [("double_block", i) for i in range(4)]
    assert f"double_layers '{layers}', single_layers ''" in table


def test_inspector_maps_hunyuan_video_layers_to_double_and_single_blocks():
    """HunyuanVideo: our layers are the double blocks then the single blocks; SLG numbers each kind
    from 0. The mapping is read from the model's block-replace points in the inspector's evaluation."""
    import dataclasses
    from support.families import BY_ID
    fam = BY_ID["hunyuan_video"]
    model = load(fam)
    report = inspect_attention(model, family_latent(fam), conditioning(fam, 1), 1.0, seed=0, top_k=1)
    assert report.blocks == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    every = dataclasses.replace(report, top=[0, 2, 3])
    assert every.layer_list() == "0, 2, 3" and every.slg_layers() == ("0", "0, 1")
    assert slg_parsed(model, *every.slg_layers()) == ([0], [0, 1])
    none = dataclasses.replace(report, blocks=[None] * 4)
    assert none.slg_layers() == ("", "") and "its outputs are empty" in none.table()


def test_inspector_bad_input(wan21):
    with pytest.raises(ValueError, match="sigma: 5.0 is outside"):
        inspect_attention(wan21, video_latent(), POS, 5.0)
    with pytest.raises(ValueError, match="top_k: 9"):
        inspect_attention(wan21, video_latent(), POS, 1.0, top_k=9)


def test_nodes_have_tooltips_and_run(wan21):
    from freevideo.nodes import NODES
    from freevideo.nodes.attention_inspector import AttentionInspector
    from freevideo.nodes.entropy_guidance import EntropyGuidance as GuidanceNode
    assert GuidanceNode in NODES and AttentionInspector in NODES
    for node in (GuidanceNode, AttentionInspector):
        schema = node.define_schema()
        assert all(i.tooltip for i in schema.inputs), node
    out = GuidanceNode.execute(wan21, 1.0, "uniform", "identity", "auto", 1, 512, 0.0, 1.0)
    assert out.result[0] is not wan21
    image, table, layers, double, single = AttentionInspector.execute(wan21, video_latent(), POS, 1.0, 0, 1, 512).result
    assert image.ndim == 4 and "layer" in table
    assert len(layers.split(",")) == 1 and double == layers and single == ""
    assert set(PAIRS) == {("uniform", "identity"), ("original", "identity"), ("uniform", "original")}


# --- every family the adapters support --------------------------------------------------------


def _as_output_layout(v, heads, kwargs):
    """The kernel's v in the layout of its output (what the identity map must return)."""
    if kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape"):
        return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)
    if not kwargs.get("skip_reshape") and kwargs.get("skip_output_reshape"):
        return v.view(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
    return v


@pytest.mark.families
@pytest.mark.parametrize("attention_map", ["video tokens", "whole map"])
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_every_family_registers_and_replaces(fam, attention_map):
    """One real step on each family's tiny model (joint text-video attention, masks, heads-first
    layouts): exactly one kernel call (the registered layer) returns V for the identity branch and one
    value per key-set for every query of the uniform branch, over the video tokens (text rows keep
    their attention) or the whole map; and the inspector at the same sigma and noise ranks the same
    layer first with the same entropy. The uniform (cond 2) and identity (cond 3) branches may run
    in one forward or, where the model takes one batch element per call (MiniMax H3), in two."""
    model = load(fam)
    g = EntropyGuidance(guided := model.clone(), 2.0, attention_map=attention_map)
    guided = guided.clone()
    branch = {}  # (layer, cond) -> (kernel output, V in the output's layout, token dim, map span, seq_len)

    def record(call):
        q, v, heads, kwargs = call.q, call.v, call.heads, call.kwargs
        out = call.run()
        groups = kwargs["transformer_options"].get("cond_or_uncond") or []
        per = q.shape[0] // max(len(groups), 1)
        seq = -2 if kwargs.get("skip_output_reshape") else 1
        for c in (2, 3):
            if c in groups:
                rows = slice(groups.index(c) * per, (groups.index(c) + 1) * per)
                assert (call.layer, c) not in branch
                branch[call.layer, c] = (out[rows], _as_output_layout(v, heads, kwargs)[rows], seq,
                                         call.map_span(attention_map) or (0, out.shape[seq]), out.shape[seq])
        return out
    SelfAttentionLayers(guided, adapter_for(guided), "test_recorder", "test recorder").route(range(g.n_layers), record)
    latent = family_latent(fam)
    out = flat(ksample(guided, latent, conditioning(fam, 1), conditioning(fam, 2), steps=1, cfg=3.0))
    assert torch.isfinite(out).all()
    calls = []
    for layer in sorted({layer for layer, _ in branch}):
        (out2, _, seq, (start, stop), seq_len), (out3, v3, _, _, _) = branch[layer, 2], branch[layer, 3]
        part = lambda t, a=start, b=stop: t.narrow(seq, a, b - a)  # noqa: E731
        replaced = (torch.equal(part(out3), part(v3)), bool((part(out2) - part(out2).narrow(seq, 0, 1)).abs().max() < 1e-5))
        if replaced == (True, True) and stop - start < seq_len:
            # Other rows (text, audio) keep the original attention: the same in both branches (same
            # input), and not the identity's V.
            a, b = (0, start) if start > 0 else (stop, seq_len)
            torch.testing.assert_close(part(out2, a, b), part(out3, a, b), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(part(out3, a, b), part(v3, a, b))
        calls.append(replaced)
    assert len(g.last_run.registered) == 1 and calls.count((True, True)) == 1 and all(c == (False, False) for c in calls if c != (True, True))
    first_sigma = float(model.get_model_object("model_sampling").sigma_max)
    report = inspect_attention(model, latent, conditioning(fam, 1), first_sigma, seed=0, attention_map=attention_map)
    assert report.top == g.last_run.registered
    assert report.entropy == pytest.approx([g.last_run.entropies[i] for i in range(len(report.entropy))], abs=1e-3)
    # SkipLayerGuidanceDiT's block of each layer is the block module that holds the layer: index j of
    # single_blocks for ("single_block", j), of the one other block list for ("double_block", j).
    paths = [b.path for b in adapter_for(model).blocks(model.get_model_object("diffusion_model"))]
    for point, path in zip(report.blocks, paths):
        if point is not None:
            assert (point[0] == "single_block") == path.startswith("single_blocks.") and path.endswith(f".{point[1]}"), (point, path)
    assert (None in report.blocks) == (fam.id in ("cosmos_predict2", "cosmos1", "cogvideox", "kandinsky5", "ltx2", "minimax_h3"))


@pytest.mark.families
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_sampled_estimate_ranks_layers_as_exact_entropy_except_near_ties(fam):
    """The estimate (32 query rows per head here) may swap two layers only where their exact
    entropies are closer than the estimate's own error: the reason the registry is exact by default.
    The disagreement is printed (pytest -s)."""
    import itertools
    model = load(fam)
    latent = family_latent(fam, size=fam.size * 2)
    sigma = float(model.get_model_object("model_sampling").sigma_max)
    exact = inspect_attention(model, latent, conditioning(fam, 1), sigma, entropy_rows=0).entropy
    estimate = inspect_attention(model, latent, conditioning(fam, 1), sigma, entropy_rows=32).entropy
    error = max(abs(a - b) for a, b in zip(exact, estimate))
    pairs = list(itertools.combinations(range(len(exact)), 2))
    swapped = [(i, j) for i, j in pairs if (exact[i] - exact[j]) * (estimate[i] - estimate[j]) < 0]
    top_same = max(range(len(exact)), key=exact.__getitem__) == max(range(len(exact)), key=estimate.__getitem__)
    print(f"{fam.id}: {len(swapped)}/{len(pairs)} layer pairs ranked differently, top-1 "
          f"{'same' if top_same else 'different'}, largest error {error:.4f}")
    assert error < 0.02
    assert all(abs(exact[i] - exact[j]) < 2 * error for i, j in swapped), (exact, estimate)


def shared_and_full(model, layers: str, sample, monkeypatch):
    """Guided results with the shared prefix and with full branches (the family adapter's
    prefix_points turned off), and the self-attention batch size per layer in each run's last step."""
    n = len(adapter_for(model).sites(model.get_model_object("diffusion_model")))
    sizes = []

    def record(call):
        sizes.append((call.layer, call.batch))
        return call.run()

    def run():
        m = apply_entropy_guidance(model, 2.0, layers=layers).clone()
        SelfAttentionLayers(m, adapter_for(m), "test_sizes", "test").route(range(n), record)
        out = sample(m)
        last, sizes[:] = sizes[-n:], []
        return out, last
    shared, shared_sizes = run()
    monkeypatch.setattr(type(adapter_for(model)), "prefix_points", lambda self, diffusion_model: None)
    full, full_sizes = run()
    return shared, full, shared_sizes, full_sizes


@pytest.mark.parametrize("layers", ["2", "1, 3"])
def test_shared_prefix_gives_todays_result_and_skips_the_branches_before_the_layer(layers, monkeypatch):
    """Wan: the branches copy the conditional element up to the first registered layer, so the blocks
    before it run without them; the guided result equals running the branches through every block."""
    from support import tiny_models
    model = tiny_models.load_diffusion_model(tiny_models.wan21_t2v())
    shared, full, shared_sizes, full_sizes = shared_and_full(model, layers, lambda m: first_denoised(m, steps=2), monkeypatch)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
    first = int(layers.split(",")[0])
    # Second step (after the registry step): cond, uncond and two branches = 4 elements, but only
    # cond and uncond before the first registered layer.
    assert shared_sizes == [(i, 2 if i < first else 4) for i in range(4)], shared_sizes
    assert full_sizes == [(i, 4) for i in range(4)]


@pytest.mark.families
@pytest.mark.parametrize("fam_id", ["ltxv", "mochi", "hunyuan_video", "hunyuan_video_15"])
def test_shared_prefix_on_other_families_gives_the_full_branches_result(fam_id, monkeypatch):
    """LTX-Video, Mochi and HunyuanVideo share the prefix too (ComfyUI's block-replace points, in
    self-attention layer order; Mochi's and HunyuanVideo's double blocks carry the text stream as
    well): the sampled result equals the branches run through every block."""
    from support.families import BY_ID, sample as family_sample
    fam = BY_ID[fam_id]
    model = load(fam)
    n = len(adapter_for(model).sites(model.get_model_object("diffusion_model")))
    shared, full, shared_sizes, full_sizes = shared_and_full(model, str(n - 1), lambda m: family_sample(fam, m, steps=2),
                                                             monkeypatch)
    # float32 rounding: the shared run multiplies batches of 2 where the full one multiplies 4, and
    # outputs reach 20 in magnitude (HunyuanVideo), so single elements differ by up to 1.5e-5; the
    # guidance itself moves the result by 0.3-0.65 on average
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
    assert not torch.equal(full, family_sample(fam, model, steps=2))  # the guidance acts
    # The last step: cond, uncond and two branches, but only cond and uncond before layer n - 1.
    assert shared_sizes == [(i, 2 if i < n - 1 else 4) for i in range(n)], shared_sizes
    assert full_sizes == [(i, 4) for i in range(n)]


def test_wan_shares_the_prefix_only_on_variants_read_exact(wan21):
    """Wan variants get prefix points only where their blocks read nothing batch-sized beyond the
    block-replace arguments: plain WanModel (and its listed variants) do; HuMo (audio tokens),
    WanAnimate2 (pose keys and buffers, newer ComfyUI) and a variant nobody has read do not."""
    import comfy.ldm.wan.model as wan_model
    from freevideo.enhance_core.models.wan import SHARED_PREFIX_EXACT, WanAdapter
    adapter = WanAdapter()
    assert adapter.prefix_points(wan21.get_model_object("diffusion_model")) == [("double_block", i) for i in range(4)]
    unread = type("UnreadWanVariant", (wan_model.WanModel,), {})
    excluded = [wan_model.HumoWanModel, unread]
    try:
        from comfy.ldm.wan.model_animate2 import WanAnimate2Model
        excluded.append(WanAnimate2Model)
    except ImportError:
        pass
    for cls in excluded:
        assert cls.__name__ not in SHARED_PREFIX_EXACT
        assert adapter.prefix_points(object.__new__(cls)) is None, cls.__name__
    # The variants both ComfyUI versions have are listed under their real class names.
    import comfy.ldm.wan.model_animate as animate
    present = {name for module in (wan_model, animate) for name, c in vars(module).items()
               if isinstance(c, type) and issubclass(c, wan_model.WanModel)}
    assert {"WanModel", "VaceWanModel", "CameraWanModel", "WanModel_S2V", "AnimateWanModel"} <= SHARED_PREFIX_EXACT & present


def test_registry_and_inspector_each_equal_a_naive_entropy(wan21):
    """The registry's per-layer entropy and the inspector's, each against the naive softmax entropy of
    the conditional element's q and k recorded in the same forward (not against each other)."""
    def naive_per_layer(calls):
        out = {}
        for i, call in enumerate(calls[:8]):  # one forward: 4 blocks x (self, cross)
            if i % 2 == 0:
                e = element(call, 0)
                split = lambda t: t.view(t.shape[0], t.shape[1], call["heads"], -1).transpose(1, 2)  # noqa: E731
                out[i // 2] = float(naive_entropy(split(e["q"]), split(e["k"])).mean())
        return out
    g = EntropyGuidance(guided := wan21.clone(), 1.0, top_k=1)
    model, calls = recorder(guided)
    ksample(model, video_latent(), POS, NEG, steps=1, cfg=4.0)
    assert sorted(calls[0]["groups"]) == [0, 1]
    for layer, e in naive_per_layer(calls).items():
        assert g.last_run.entropies[layer] == pytest.approx(e, abs=1e-4), layer
    inspected, calls = recorder(wan21)
    report = inspect_attention(inspected, video_latent(), POS, sigma=0.7, seed=3)
    for layer, e in naive_per_layer(calls).items():
        assert report.entropy[layer] == pytest.approx(e, abs=1e-4), layer
