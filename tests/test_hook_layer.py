"""The shared hook layer in the user's graph: any node order around a neighbour that overwrites the
attention-override slot, ComfyUI's multi-GPU deep clones, and model calls running concurrently in
threads (as multi-GPU work units do). Real ComfyUI patcher, loaders and samplers on tiny Wan 2.1."""

import threading

import pytest
import torch

import comfy.model_management
import comfy.utils
from freevideo.enhance_core.patching.attention_slot import OVERRIDE_KEY, add_attention_override
from freevideo.enhance_core.patching.module_hooks import hooked_copy
from freevideo.enhance_core.methods.attention_inspector import inspect_attention
from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.entropy_guidance import apply_entropy_guidance
from freevideo.enhance_core.methods.evs.sampler import SelectiveFeatureInjection
from support.deep_clones import (concurrent_calls_match_alone, deep_clone_acts_on_its_own_weights, forget_released_patchers,
                                 fresh_wan, needs_deep_clones, two_cpu_devices_work_units)
from support.sampling import ksample, text_conditioning, video_latent

POS, NEG = text_conditioning(seed=1), text_conditioning(seed=2)


def sample(model, steps=2):
    return ksample(model, video_latent(frames=5), POS, NEG, steps=steps)


class SlotOverwriter:
    """A neighbour node as ComfyUI 0.33's attention-backend node and other packs' Sage / flash
    patches are written: it *sets* the override slot of its clone, dropping whatever was there, and
    computes attention with the kernel it is handed. It counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model):
        m = model.clone()

        def override(func, *args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)
        m.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override
        return m


def comfy_attention_backend():
    """ComfyUI's own attention-backend node where the running ComfyUI has it (0.33), else None."""
    try:
        from comfy_extras.nodes_model_advanced import ModelAttentionBackend
    except ImportError:
        return None
    return lambda model: ModelAttentionBackend().patch(model, "pytorch attention")[0]


NODES = {
    "enhance_a_video": lambda m: apply_enhance_a_video(m, weight=40.0),
    "entropy_guidance": lambda m: apply_entropy_guidance(m, 3.0, layers="1"),
}


@pytest.mark.parametrize("order", ["neighbour before ours", "neighbour after ours"])
@pytest.mark.parametrize("node", sorted(NODES))
def test_any_order_around_a_slot_overwriting_neighbour(wan21, node, order):
    ours = NODES[node]
    plain, alone = sample(wan21), sample(ours(wan21))
    assert not torch.equal(plain, alone)
    neighbour = SlotOverwriter()
    only_neighbour = sample(neighbour(wan21))
    calls_alone = neighbour.calls
    assert calls_alone > 0 and torch.equal(only_neighbour, plain)
    neighbour.calls = 0
    stacked = ours(neighbour(wan21)) if order == "neighbour before ours" else neighbour(ours(wan21))
    result = sample(stacked)
    # Our effect is all there (the neighbour computes the same kernel), and the neighbour still
    # sees every kernel call (none of its attention is dropped; the guidance adds branch calls).
    assert torch.equal(result, alone)
    assert neighbour.calls >= calls_alone


@pytest.mark.parametrize("order", ["before", "after"])
def test_comfyuis_attention_backend_node_in_either_order(wan21, order):
    backend = comfy_attention_backend()
    if backend is None:
        pytest.skip("this ComfyUI has no ModelAttentionBackend node (added after 0.3.75)")
    for ours in NODES.values():
        stacked = ours(backend(wan21)) if order == "before" else backend(ours(wan21))
        torch.testing.assert_close(sample(stacked), sample(ours(wan21)), rtol=1e-5, atol=1e-6)
        assert not torch.equal(sample(stacked), sample(backend(wan21)))


def test_inspector_reads_through_a_neighbours_override(wan21):
    latent = video_latent(frames=5)
    sigma = float(wan21.get_model_object("model_sampling").sigma_max) * 0.5
    neighbour = SlotOverwriter()
    expected = inspect_attention(wan21, latent, POS, sigma)
    report = inspect_attention(neighbour(wan21), latent, POS, sigma)
    assert neighbour.calls > 0
    assert report.entropy == expected.entropy and report.cfi == expected.cfi


# multi-GPU deep clones ---------------------------------------------------------------------------
def _sfi_clone(model):
    clone = model.clone()
    SelectiveFeatureInjection(clone, "all", 0.8)
    return clone


PATCHES = dict(NODES, evs_feature_injection=_sfi_clone)


@pytest.mark.parametrize("node", sorted(PATCHES))
def test_deep_clone_hooks_act_on_the_deep_clones_own_weights(node):
    needs_deep_clones()
    # EVS feature injection's effect needs an inversion first: the identity is what a deep clone needs.
    deep_clone_acts_on_its_own_weights(PATCHES[node], sample, weight_effect=node != "evs_feature_injection")


def test_rehooking_keeps_stacked_hooks_in_order():
    # hooked_copy of a hooked copy keeps the original module and every hook, newest outermost.
    base = torch.nn.Linear(2, 2)
    seen = []
    first = hooked_copy(base, lambda call, *a: (seen.append("first"), call(*a))[1])
    second = hooked_copy(first, lambda call, *a: (seen.append("second"), call(*a))[1])
    second(torch.zeros(1, 2))
    assert seen == ["second", "first"] and second._freevideo_original is base
    assert "_freevideo_original" not in base._modules


def test_deep_clones_called_concurrently_match_each_called_alone():
    # Enhance-A-Video holds the most per-call state: the token layout, the armed layer and the
    # scale waiting for the layer's output module.
    needs_deep_clones()
    concurrent_calls_match_alone(apply_enhance_a_video(fresh_wan(), weight=40.0))


def _manual_attention_forward(module):
    """A Wan self-attention forward that computes attention itself, not through ComfyUI's attention
    functions (as a pack's own attention patch may)."""
    def forward(x, freqs, *args, **kwargs):
        from comfy.ldm.flux.math import apply_rope
        b, n, _ = x.shape
        q = module.norm_q(module.q(x)).view(b, n, module.num_heads, -1)
        k = module.norm_k(module.k(x)).view(b, n, module.num_heads, -1)
        v = module.v(x).view(b, n, module.num_heads, -1)
        q, k = apply_rope(q, k, freqs)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return module.o(out.transpose(1, 2).reshape(b, n, -1))
    return forward


@pytest.mark.parametrize("order", ["neighbour before ours", "neighbour after ours"])
def test_a_neighbours_own_attention_keeps_running_and_is_named_in_the_log(wan21, order, caplog):
    """A neighbour object-patches layer 1's forward with attention of its own (as KJNodes' Enhance-
    A-Video does): in either order its forward runs (our hooks sit on the module's children, not on
    its path), no kernel call of that layer reaches us, and the log names layer 1."""
    calls = []

    def neighbour(model):
        m = model.clone()
        path = "diffusion_model.blocks.1.self_attn"
        forward = _manual_attention_forward(wan21.get_model_object(path))
        m.add_object_patch(path + ".forward", lambda *a, **kw: (calls.append(1), forward(*a, **kw))[1])
        return m
    stacked = apply_enhance_a_video(neighbour(wan21), 40.0) if order == "neighbour before ours" \
        else neighbour(apply_enhance_a_video(wan21, 40.0))
    with caplog.at_level("WARNING"):
        result = sample(stacked)
    assert calls, "the neighbour's attention did not run"
    warnings = [r.getMessage() for r in caplog.records if "cannot act on every layer" in r.getMessage()]
    assert len(warnings) == 1 and "layer(s) 1 computed attention outside ComfyUI's attention functions" in warnings[0], warnings
    # The other layers are still enhanced; the neighbour's layer 1 still runs its own attention.
    assert torch.equal(result, sample(apply_enhance_a_video(neighbour(wan21), 40.0, layers="0, 2-3")))
    assert not torch.equal(result, sample(neighbour(wan21)))
    # Nothing is left behind on the loaded model: plain sampling is plain again.
    assert torch.equal(sample(wan21), sample(wan21.clone()))


def test_a_layer_a_neighbour_skips_is_named_in_the_log(wan21, caplog):
    """A neighbour that skips block 1 (as skip-layer guidance does, through ComfyUI's block-replace
    patch): layer 1 never runs, and the log says so."""
    def skip_block_1(model):
        m = model.clone()
        m.set_model_patch_replace(lambda args, extra: {"img": args["img"]}, "dit", "double_block", 1)
        return m
    with caplog.at_level("WARNING"):
        sample(skip_block_1(apply_enhance_a_video(wan21, 40.0)))
    warnings = [r.getMessage() for r in caplog.records if "cannot act on every layer" in r.getMessage()]
    assert len(warnings) == 1 and "layer(s) 1 did not run" in warnings[0], warnings


@pytest.mark.parametrize("node", sorted(NODES))
def test_multigpu_work_units_node_splits_our_patched_model(node, monkeypatch):
    """ComfyUI's own MultiGPU_WorkUnits node and thread pool, with two CPU devices standing in for
    two GPUs ("cpu" and "cpu:0" compare unequal, so ComfyUI makes a deep clone for the second and
    runs its work units in a worker thread). The split result equals the single-device result."""
    MultiGPUCFGSplitNode = two_cpu_devices_work_units(monkeypatch)
    threads = set()
    model = fresh_wan()
    add_attention_override(model, "test_threads", lambda call_next, *a, **kw: (threads.add(threading.get_ident()), call_next(*a, **kw))[1])
    patched = NODES[node](model)
    single = sample(patched)
    threads.clear()
    forget_released_patchers()
    split_model = MultiGPUCFGSplitNode.execute(patched, 2)[0]
    (deep,) = split_model.get_additional_models_with_key("multigpu")
    assert deep.load_device == torch.device("cpu", 0) and deep.model is not patched.model
    split = sample(split_model)
    assert len(threads) == 2, "the work units did not run on two threads"
    # cond and uncond run as separate batches on the two devices: float noise of batch size only.
    plain_single = sample(model)
    forget_released_patchers()
    plain_split = sample(MultiGPUCFGSplitNode.execute(model, 2)[0])
    noise = float((plain_split - plain_single).abs().max())
    assert float((split - single).abs().max()) <= max(10 * noise, 1e-4)
    assert not torch.equal(split, plain_split)
