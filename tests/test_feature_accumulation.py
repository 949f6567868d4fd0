"""Cross-layer feature accumulation (RepVideo) against a naive implementation of the reference rule.

The naive rule keeps the reference's list cache (restart with the layer's output when i % m == 0,
else append; torch.stack(...).mean), starting from the block-0 input, and is installed with plain
PyTorch hooks on an unpatched model. The node's result is compared with it where the mixed features
enter each layer: the normalised attention input of every block and the q, k, v of every attention
kernel call, then the sampled latent. Real ComfyUI loaders, patcher and KSampler on tiny models.
"""

import copy
import inspect

import pytest
import torch

from freevideo.enhance_core.patching.attention_slot import add_attention_override
from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.entropy_guidance import apply_entropy_guidance
from freevideo.enhance_core.methods.feature_accumulation import (GroupAccumulator, apply_feature_accumulation, parse_gates,
                                                          plan)
from freevideo.enhance_core.models import adapter_for
from support import tiny_models
from support.deep_clones import concurrent_calls_match_alone, deep_clone_acts_on_its_own_weights, fresh_wan, needs_deep_clones, one_call
from support.families import FAMILIES, FRAMES
from support.families import sample as family_sample
from support.sampling import ksample, text_conditioning, video_latent

POS, NEG = text_conditioning(seed=1), text_conditioning(seed=2)


def sample(model, steps=2, frames=3):
    return ksample(model, video_latent(frames=frames), POS, NEG, steps=steps)


_plain = {}


def plain(wan21, steps=2):
    if steps not in _plain:
        _plain[steps] = sample(wan21, steps=steps)
    return _plain[steps]


# --- the naive reference rule ------------------------------------------------------------------

def naive_inputs(block_fns, h0, gates, m):
    """Run blocks with the reference's list cache; returns (inputs each block computed with, out)."""
    cache, inputs, h = [h0], [], h0
    for i, fn in enumerate(block_fns):
        g = gates.get(i, 0.0)
        h = g * torch.stack(cache).mean(0) + (1 - g) * h
        inputs.append(h)
        h = fn(h)
        cache = [h] if i % m == 0 else cache + [h]
    return inputs, h


class TinyBlock(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 8 ** 0.5)

    def forward(self, x):
        return x + torch.tanh(x @ self.w)


@pytest.mark.parametrize("m", [1, 2, 3, 6])
def test_running_sum_equals_the_list_cache_on_a_stack_of_blocks(m):
    blocks = [TinyBlock(s) for s in range(13)]
    gates = parse_gates("0.5, 0.1, 0.3, 0.9, 0.2, 0.6, 1.0, 0.4, 0.5, 0.7, 0.8, 0.05, 0.25", 13, list(range(13)))
    mixing, needed = plan(gates, m)
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_out = naive_inputs(blocks, h, gates, m)
        acc, got = GroupAccumulator(m), []
        for i, block in enumerate(blocks):
            if i in mixing and acc.count:
                h = acc.mix(h, mixing[i])
            got.append(h)
            h = block(h)
            if i in needed:
                acc.add(i, h)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"layer {i}")
    torch.testing.assert_close(h, want_out, rtol=1e-5, atol=1e-5)
    assert needed == set(range(12))  # every output but the last is averaged by a later layer


@pytest.mark.parametrize("mixing,m,needed", [({5: 0.5}, 3, {3, 4}), ({3: 0.5}, 3, {0, 1, 2}), ({4: 0.5}, 3, {3}),
                                             ({1: 0.5, 9: 0.1}, 6, {0, 6, 7, 8}), ({0: 0.5}, 6, set())])
def test_only_outputs_a_later_layer_of_the_group_averages_are_summed(mixing, m, needed):
    assert plan(mixing, m)[1] == needed


def test_only_one_running_sum_is_held():
    acc = GroupAccumulator(6)
    outs = [torch.full((1, 2), float(i)) for i in range(8)]
    for i, o in enumerate(outs):
        acc.add(i, o)
    assert acc.count == 2 and torch.equal(acc.sum, outs[6] + outs[7])  # restarted at layer 6
    assert acc.sum is not outs[6]  # its own buffer: the model may change its output in place


def test_sum_follows_batch_rows_copied_between_blocks():
    """Guidance branches that copy a cond may skip the first blocks and get the cond's hidden state
    copied in (IE-Adapt's shared prefix): their rows get the cond's running sum."""
    acc = GroupAccumulator(6)
    outs = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    acc.add(0, outs[0])
    acc.add(1, outs[1])
    h = torch.cat([outs[1], outs[1][:1]])  # rows: cond, uncond, a branch copying cond
    assert acc.follow_rows(2, h)
    torch.testing.assert_close(acc.sum, (outs[0] + outs[1])[[0, 1, 0]])
    assert not acc.follow_rows(2, torch.randn(3, 3, 4)) and acc.sum is None  # cannot tell: restart


# --- every family ------------------------------------------------------------------------------

# Block lists to lengthen (tiny models have 2 blocks, where the rule has nothing to average): the
# copies make 3x as many layers.
GROWN = {"hunyuan_video": ("double_blocks", "single_blocks"), "hunyuan_video_15": ("double_blocks",),
         "cosmos_predict2": ()}
# Where each family forms its self-attention input from the block's hidden state (ComfyUI code):
# a module whose first argument is that state, or "rms" (LTX-Video, LTX-2's video stream:
# rms_norm(x) * (1 + scale) + shift, a function, reproduced here).
ATTENTION_INPUT = {
    "wan22_ti2v_5b": lambda p: "norm1", "ltxv": lambda p: "rms", "ltx2": lambda p: "rms", "mochi": lambda p: "attn",
    "hunyuan_video": lambda p: "img_norm1" if p.startswith("double") else "pre_norm",
    "hunyuan_video_15": lambda p: "img_norm1", "cosmos_predict2": lambda p: "layer_norm_self_attn",
    "cosmos1": lambda p: "blocks.0.norm_state", "cogvideox": lambda p: "norm1", "kandinsky5": lambda p: "self_attention_norm",
    "minimax_h3": lambda p: "norm1",
}


def grown(fam):
    """A freshly loaded copy of the family's tiny model with 3x the blocks."""
    if fam.requires is not None:
        pytest.importorskip(fam.requires)
    path = getattr(tiny_models, fam.file)()
    model = getattr(tiny_models, fam.loader)() if fam.loader else tiny_models.load_diffusion_model(path)
    dm = model.get_model_object("diffusion_model")
    names = GROWN.get(fam.id)
    if names is None:
        names = [n for n in ("blocks", "transformer_blocks", "visual_transformer_blocks") if hasattr(dm, n)]
    for name in names:
        blocks = getattr(dm, name)
        if isinstance(blocks, torch.nn.ModuleDict):
            n = len(blocks)
            for k in range(2 * n):
                blocks[f"block{n + k}"] = copy.deepcopy(blocks[f"block{k % n}"])
        else:
            blocks.extend([copy.deepcopy(b) for _ in range(2) for b in blocks])
    return model


def _hidden(args, kwargs, block):
    block = getattr(block, "_freevideo_original", block)  # the model may still hold the node's hooked copy
    name = list(inspect.signature(type(block).forward).parameters)[1]
    return (args[0] if args else kwargs[name]), name


class Naive:
    """The reference rule as PyTorch hooks on a model's own modules (list cache, stack + mean)."""

    def __init__(self, fam, model, gates, m, mode):
        self.handles, self.cache = [], None
        dm = model.get_model_object("diffusion_model")
        adapter = adapter_for(model)
        self.layout = None
        sites = adapter.blocks(dm)
        for i, site in enumerate(sites):
            block = dm.get_submodule(site.path)
            self.handles.append(block.register_forward_pre_hook(self._pre(i, block, gates.get(i, 0.0), mode), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i, m)))
            if mode == "attention input":
                where = ATTENTION_INPUT[fam.id](site.path)
                if where == "rms":
                    self.handles.append(block.attn1.register_forward_pre_hook(self._ltxv_attn1(block), with_kwargs=True))
                else:
                    self.handles.append(block.get_submodule(where).register_forward_pre_hook(self._swap_input))
        self.pending = None
        self.block_kwargs = None
        # MiniMax H3's state is one packed [rows, channels] sequence whose last rows are the target
        # video (FRAMES frames of (size / 2)^2 rows); text, audio and the rest are left alone.
        self.video_rows = FRAMES * (fam.size // 2) ** 2 if fam.id == "minimax_h3" else None

    def _video(self, t):
        """Video tokens of a hidden state: joint HunyuanVideo single-block sequences hold text too;
        where, is found where the last video-only output reappears in the first joint input."""
        if self.video_rows is not None:
            return t[-self.video_rows:], t.shape[0] - self.video_rows
        if t.ndim == 3 and self.video is not None and t.shape[1] != self.video:
            if self.start is None:
                first = torch.equal(t[:, :self.video], self.last_video)
                assert first != torch.equal(t[:, -self.video:], self.last_video)
                self.start = 0 if first else t.shape[1] - self.video
            return t[:, self.start:self.start + self.video], self.start
        return t, None

    def _pre(self, i, block, g, mode):
        def hook(module, args, kwargs):
            h, name = _hidden(args, kwargs, block)
            streams = h if isinstance(h, tuple) else None  # LTX-2's (video, audio): the rule acts on the video
            h = h[0] if streams else h
            if i == 0:
                self.video = h.shape[1] if h.ndim == 3 else None
                self.start = self.last_video = None
                self.cache = [self._video(h)[0]]
            v, start = self._video(h)
            mixed = g * torch.stack(self.cache).mean(0) + (1 - g) * v
            if start is not None:
                full = h.clone()
                full[..., start:start + v.shape[-2], :] = mixed
                mixed = full
            self.block_kwargs = kwargs
            if mode == "block input":
                mixed = (mixed,) + streams[1:] if streams else mixed
                if args:
                    return (mixed,) + args[1:], kwargs
                return args, dict(kwargs, **{name: mixed})
            self.pending = (h, mixed)
        return hook

    def _post(self, i, m):
        def hook(module, args, out):
            o = self._video(out if torch.is_tensor(out) else out[0])[0].clone()
            if self.video is not None and o.shape[1] == self.video:
                self.last_video = o
            self.cache = [o] if i % m == 0 else self.cache + [o]
        return hook

    def _swap_input(self, module, args):
        if self.pending is None:
            return None
        h, mixed = self.pending
        self.pending = None
        return (args[0] + (mixed - h),) + args[1:]

    def _ltxv_attn1(self, block):
        def hook(module, args, kwargs):
            h, mixed = self.pending
            self.pending = None
            x, t = h, self.block_kwargs.get("timestep")
            table = block.scale_shift_table
            if t is None:  # LTX-2: its video timestep is in a per-frame form the block expands itself
                shift, scale = block.get_ada_values(table, x.shape[0], self.block_kwargs["v_timestep"], slice(0, 2))
            else:
                mod = table[None, None, :6] + t.reshape(x.shape[0], t.shape[1], table.shape[0], -1)[:, :, :6]
                shift, scale = mod.unbind(dim=2)[:2]
            return (torch.nn.functional.rms_norm(mixed, mixed.shape[-1:], eps=1e-6) * (1 + scale) + shift,) + args[1:], kwargs
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def record_layer_inputs(fam, model, into):
    """Forward hooks that record the attention input each block forms (the output of the module in
    ATTENTION_INPUT, the input of LTX-Video's attn1). Hooks on the original modules also run for
    the node's hooked copies (they share the hook dicts)."""
    dm = model.get_model_object("diffusion_model")
    handles = []
    for site in adapter_for(model).blocks(dm):
        block = dm.get_submodule(site.path)
        where = ATTENTION_INPUT[fam.id](site.path)
        if where == "rms":
            handles.append(block.attn1.register_forward_pre_hook(lambda m, a: into.append(a[0].clone())))
        else:
            handles.append(block.get_submodule(where).register_forward_hook(
                lambda m, a, o: into.append((o if torch.is_tensor(o) else o[0]).clone())))
    return handles


def kernel_recorder(model, into):
    clone = model.clone()

    def record(call_next, q, k, v, heads, *args, **kwargs):
        into.append((q.clone(), k.clone(), v.clone()))
        return call_next(q, k, v, heads, *args, **kwargs)
    add_attention_override(clone, "test_kernel_recorder", record)
    return clone


@pytest.fixture(scope="module")
def family_models():
    models = {}
    yield models
    models.clear()


@pytest.mark.families
@pytest.mark.parametrize("mode", ["attention input", "block input"])
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_layer_inputs_equal_the_naive_rule(fam, mode, family_models):
    if fam.id not in family_models:
        family_models[fam.id] = grown(fam)
    model = family_models[fam.id]
    n = len(adapter_for(model).blocks(model.get_model_object("diffusion_model")))
    m = 2 if mode == "block input" else 3
    gate_text = ", ".join(f"{0.2 + 0.6 * (i % 3) / 2:.1f}" for i in range(n))  # 0.2, 0.5, 0.8, ...
    gates = parse_gates(gate_text, n, list(range(n)))

    def run(patched, naive=None):
        inputs, kernels = [], []
        handles = record_layer_inputs(fam, model, inputs)
        try:
            out = family_sample(fam, kernel_recorder(patched, kernels), steps=1)
        finally:
            for h in handles:
                h.remove()
            if naive is not None:
                naive.remove()
        return inputs, kernels, out

    if fam.id + " plain" not in family_models:
        family_models[fam.id + " plain"] = run(model)
    plain_inputs, _, plain_out = family_models[fam.id + " plain"]
    naive = Naive(fam, model, gates, m, mode)
    want_inputs, want_kernels, want_out = run(model, naive)
    got_inputs, got_kernels, got_out = run(apply_feature_accumulation(model, gate_text, m, mode))
    # n per model call: one call, or one per cond where the model takes one batch element (MiniMax H3).
    assert len(got_inputs) == len(want_inputs) == len(plain_inputs) and len(got_inputs) % n == 0
    for j, (got, want, plain) in enumerate(zip(got_inputs, want_inputs, plain_inputs)):
        i = j % n
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda s: f"layer {i}: {s}")
        if i >= 2 and i % m != 1:  # the layers whose cache holds more than their own input
            assert not torch.allclose(got, plain, rtol=1e-4, atol=1e-5), f"layer {i} was not mixed"
    assert len(got_kernels) == len(want_kernels)
    for j, (got, want) in enumerate(zip(got_kernels, want_kernels)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s: f"kernel call {j}: {s}")
    torch.testing.assert_close(got_out, want_out, rtol=1e-3, atol=1e-4)
    assert not torch.equal(got_out, plain_out)


# --- off settings, the input model, stacking (tiny Wan 2.1, 4 blocks) ---------------------------

def test_changes_sampling_and_leaves_the_input_model_untouched(wan21):
    before = plain(wan21)
    for mode in ("attention input", "block input"):
        assert not torch.equal(sample(apply_feature_accumulation(wan21, "0.5", 2, mode)), before)
    assert torch.equal(sample(wan21), before)


@pytest.mark.parametrize("kwargs", [
    dict(gate="0"),
    dict(gate="0, 0, 0, 0"),
    dict(gate="0.5", layers="0-1"),  # layers 0 and 1 average only their own input: nothing to mix
    dict(gate="0.5", group_size=2, start_percent=1.0, end_percent=1.0),
    dict(gate="0.5", group_size=2, mode="block input", start_percent=1.0, end_percent=1.0),
])
def test_off_settings_are_bit_identical(wan21, kwargs):
    assert torch.equal(sample(apply_feature_accumulation(wan21, **kwargs)), plain(wan21))


def test_sigma_window_limits_the_steps(wan21):
    # Active in the first half only: equal to the full run on the first step's model call, and
    # a different result from both the plain and the always-on model.
    full = sample(apply_feature_accumulation(wan21, "0.5", 2), steps=3)
    half = sample(apply_feature_accumulation(wan21, "0.5", 2, end_percent=0.5), steps=3)
    assert not torch.equal(half, full) and not torch.equal(half, plain(wan21, steps=3))


def test_per_layer_gate_list_only_touches_its_layers(wan21):
    one = sample(apply_feature_accumulation(wan21, "0, 0, 0, 0.5", 2, layers="all"))
    same = sample(apply_feature_accumulation(wan21, "0.5", 2, layers="3"))
    assert torch.equal(one, same)
    mapped = sample(apply_feature_accumulation(wan21, "0.5, 0.3", 2, layers="2-3"))
    full = sample(apply_feature_accumulation(wan21, "0, 0, 0.5, 0.3", 2))
    assert torch.equal(mapped, full)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gate="1.5"), "gate: 1.5 is outside 0-1"),
    (dict(gate="abc"), "gate: cannot read 'abc'"),
    (dict(gate="0.1,,0.2"), "gate: .* empty value"),
    (dict(gate="0.1, 0.2, 0.3"), r"gate: 3 values given; .* \(4\), .* \(4\)"),
    (dict(gate="nan"), "outside 0-1"),
    (dict(group_size=0), "group_size: 0 must be"),
    (dict(mode="everything"), "mode: 'everything' is not one of: attention input, block input"),
    (dict(layers="0-9"), "layers: layer 9 does not exist"),
    (dict(start_percent=0.6, end_percent=0.2), "start_percent"),
])
def test_invalid_inputs_name_the_input(wan21, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_feature_accumulation(wan21, **kwargs)


def test_node_raises_when_it_runs_and_logs_once_when_sampling_starts(wan21, caplog):
    from freevideo.nodes.feature_accumulation import FeatureAccumulation
    with pytest.raises(ValueError, match="gate"):
        FeatureAccumulation.execute(wan21, "2", 6, "attention input", "all", 0.0, 1.0)
    patched = FeatureAccumulation.execute(wan21, "0.2", 2, "block input", "all", 0.0, 1.0).result[0]
    with caplog.at_level("INFO"):
        sample(patched, steps=3)
    lines = [r.getMessage() for r in caplog.records if "Cross-layer feature accumulation" in r.getMessage()]
    assert len(lines) == 1 and "block input mode, gate 0.2 on layer(s) 1-3, groups of 2" in lines[0], lines


def test_stacks_with_enhance_a_video_and_entropy_guidance(wan21):
    ours = lambda m: apply_feature_accumulation(m, "0.5", 2)  # noqa: E731
    others = {"Enhance-A-Video": lambda m: apply_enhance_a_video(m, weight=40.0),
              "IE-Adapt": lambda m: apply_entropy_guidance(m, 3.0, layers="1")}
    alone = sample(ours(wan21))
    assert not torch.equal(alone, plain(wan21))
    for name, other in others.items():
        only_other = sample(other(wan21))
        stacked = sample(other(ours(wan21)) if name == "IE-Adapt" else ours(other(wan21)))
        # Each effect is present: removing either one changes the result.
        assert torch.isfinite(stacked).all()
        assert not torch.equal(stacked, alone), name
        assert not torch.equal(stacked, only_other), name


def test_nothing_survives_the_model_call(wan21):
    from freevideo.enhance_core.methods.feature_accumulation import FeatureAccumulation
    fa = FeatureAccumulation(model := wan21.clone(), "0.5", 2)
    sample(model, steps=1)
    assert fa.call.acc is None and fa.call.layout is None and fa.call.pending is None and not fa.call.active


# --- multi-GPU deep clones and concurrent calls (ComfyUI 0.33) ---------------------------------

def test_deep_clone_hooks_act_on_the_deep_clones_own_weights(mode="attention input"):
    needs_deep_clones()
    deep_clone_acts_on_its_own_weights(lambda m: apply_feature_accumulation(m, "0.5", 2, mode), sample)


@pytest.mark.parametrize("mode", ["attention input", "block input"])
def test_deep_clones_called_concurrently_match_each_called_alone(mode):
    needs_deep_clones()
    alone, inputs = concurrent_calls_match_alone(apply_feature_accumulation(fresh_wan(), "0.5", 2, mode))
    assert not torch.equal(alone[0], one_call(fresh_wan(), *inputs[0]))


def test_block_input_mode_mixes_into_the_previous_output_instead_of_beside_it(wan21):
    """The memory goal (at most one hidden state more than plain): in block-input mode the mix is
    written into the previous block's output, so a block's normalised input is read from that very
    tensor, and nothing but the running sum is held beside it. The values are the naive rule's
    (test_layer_inputs_equal_the_naive_rule)."""
    dm = wan21.get_model_object("diffusion_model")
    outputs, norm_inputs, handles = {}, {}, []
    for i, block in enumerate(dm.blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.data_ptr())))
        handles.append(block.norm1.register_forward_pre_hook(lambda m, a, i=i: norm_inputs.__setitem__(i, a[0].data_ptr())))
    try:
        sample(apply_feature_accumulation(wan21, "0.5", 6, "block input"), steps=1)
    finally:
        for h in handles:
            h.remove()
    # Layers 1-3 mix; each block reads its mixed input from the tensor the block before returned
    # (it is alive while the block runs, so an equal address is that tensor).
    assert [norm_inputs[i] == outputs[i - 1] for i in (1, 2, 3)] == [True] * 3
