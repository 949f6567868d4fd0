"""Our nodes stacked with ComfyUI's own model patches, through ComfyUI's own node classes on tiny Wan
models: a LoRA (LoraLoaderModelOnly), a sampling shift (ModelSamplingSD3), EasyCache, context
windows, and Wan 2.2's two experts in two KSamplerAdvanced nodes (TorchCompileModel: test_torch_compile.py).

Every test measures both effects: the neighbour's (against the model without it) and ours (against
the neighbour alone), and where the two commute (a LoRA patches weights, ours hooks attention) that
the order in the graph does not matter. Neighbours a ComfyUI version lacks are detected and skipped
with a message; they are never told apart by version number.
"""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import folder_paths
import nodes
from freevideo.enhance_core.methods import enhance_a_video as enhance_a_video_module
from freevideo.enhance_core.methods.attention_inspector import inspect_attention
from support import tiny_models
from support.node_calls import comfy_extra, run_node
from support.sampling import video_latent
from support.stacking import NEG, ORDERS, OURS, POS, ModelCalls, assert_effect, sample, stack


@pytest.fixture
def cfi_calls(monkeypatch):
    """Every Enhance-A-Video scale computation: (frame count it used, tokens it got)."""
    seen = []
    original = enhance_a_video_module.enhance_scale

    def recording(q, k, frames, weight, *args, **kwargs):
        seen.append((frames, q.shape[1]))
        return original(q, k, frames, weight, *args, **kwargs)
    monkeypatch.setattr(enhance_a_video_module, "enhance_scale", recording)
    return seen


# --- LoRA --------------------------------------------------------------------------------------------
LORA_RANK = 4
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.o", "ffn.0")  # `o` is the module Enhance-A-Video hooks


def _lora_tensors(base: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    out = {}
    for i in range(4):
        for target in LORA_TARGETS:
            w = base[f"blocks.{i}.{target}.weight"]
            key = f"diffusion_model.blocks.{i}.{target}"
            out[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, w.shape[1], generator=g) / w.shape[1] ** 0.5
            out[f"{key}.lora_up.weight"] = 0.5 * torch.randn(w.shape[0], LORA_RANK, generator=g) / LORA_RANK ** 0.5
            out[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA for the tiny Wan in ComfyUI's LoRA key format (diffusion_model.<module>.lora_up/down,
    alpha), registered in ComfyUI's `loras` folder, and the model file with it merged by hand:
    (file name, loader, merged model)."""
    folder = tmp_path_factory.mktemp("loras")
    base = load_file(str(tiny_models.wan21_t2v()))
    tensors = _lora_tensors(base)
    save_file(tensors, str(folder / "tiny_wan_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    merged = dict(base)
    for i in range(4):
        for target in LORA_TARGETS:
            key = f"diffusion_model.blocks.{i}.{target}"
            up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
            merged[f"blocks.{i}.{target}.weight"] = base[f"blocks.{i}.{target}.weight"] + (up @ down) * (tensors[f"{key}.alpha"] / LORA_RANK)
    save_file(merged, str(folder / "merged.safetensors"))

    def apply(model):
        return run_node(nodes.LoraLoaderModelOnly, model=model, lora_name="tiny_wan_lora.safetensors", strength_model=1.0)[0]
    return apply, tiny_models.load_diffusion_model(folder / "merged.safetensors")


@pytest.mark.parametrize("node", sorted(OURS))
def test_lora_before_and_after_ours(wan21, lora, node):
    """The LoRA patches weights (also of the projection Enhance-A-Video hooks), ours hooks attention:
    both apply, in either order, and the result is ours on a model with the LoRA merged in."""
    apply_lora, merged = lora
    ours = OURS[node]
    plain = sample(wan21)
    lora_only, ours_only = sample(apply_lora(wan21)), sample(ours(wan21))
    lora_then_ours = sample(ours(apply_lora(wan21)))
    ours_then_lora = sample(apply_lora(ours(wan21)))
    assert_effect(lora_only, plain, "LoRA alone")
    assert_effect(lora_then_ours, lora_only, f"{node} after the LoRA")
    assert_effect(lora_then_ours, ours_only, f"the LoRA under {node}")
    torch.testing.assert_close(ours_then_lora, lora_then_ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_then_ours, sample(ours(merged)), rtol=1e-4, atol=1e-5)
    assert torch.equal(sample(wan21), plain), "the loaded model changed"


def test_inspector_measures_the_lora_model(wan21, lora):
    apply_lora, merged = lora
    latent = video_latent(frames=5)
    plain = inspect_attention(wan21, latent, POS, 1.0)
    with_lora = inspect_attention(apply_lora(wan21), latent, POS, 1.0)
    expected = inspect_attention(merged, latent, POS, 1.0)
    torch.testing.assert_close(torch.tensor(with_lora.entropy), torch.tensor(expected.entropy), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(with_lora.cfi), torch.tensor(expected.cfi), rtol=1e-4, atol=1e-5)
    assert with_lora.entropy != plain.entropy and with_lora.cfi != plain.cfi


# --- ModelSamplingSD3 ----------------------------------------------------------------------------------
def _shift(model, shift=1.0):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    return run_node(ModelSamplingSD3, model=model, shift=shift)[0]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node", sorted(OURS))
def test_window_uses_the_shifted_sampling(wan21, node, order, cfi_calls):
    """start/end percent are fractions of the model's sampling as the sampler runs it: with a
    ModelSamplingSD3 shift anywhere in the chain, the active steps are those whose sigma lies in the
    shifted model's [percent_to_sigma(end), percent_to_sigma(start)]. Tiny Wan's own shift is 8;
    shift 1 with end_percent 0.6 keeps 3 of 4 steps where shift 8 would keep 1."""
    recorder = ModelCalls()
    active = []  # sigmas of the model calls where our method acted
    if node == "enhance_a_video":
        def after(record):
            if cfi_calls:
                active.append(record["sigma"])
            cfi_calls.clear()
        recorder.after = after
    ours = lambda m: OURS[node](m, end_percent=0.6)  # noqa: E731
    model = recorder(stack(ours, _shift, wan21, order))
    sample(model, steps=4)
    steps = sorted({c["sigma"] for c in recorder.calls}, reverse=True)
    if node == "entropy_guidance":
        # Guidance adds branch conds (positive copies) to the step's evaluations: an active step
        # evaluates more than cond and uncond.
        per_step = {s: sum(c["conds"] for c in recorder.calls if c["sigma"] == s) for s in steps}
        active = [s for s, n in per_step.items() if n > 2]
    shifted = model.get_model_object("model_sampling")
    unshifted = wan21.get_model_object("model_sampling")
    assert float(shifted.percent_to_sigma(0.5)) != float(unshifted.percent_to_sigma(0.5)), "the shift did not apply"

    def window(sampling):
        lo, hi = float(sampling.percent_to_sigma(0.6)), float(sampling.percent_to_sigma(0.0))
        return [s for s in steps if lo <= s <= hi]
    expected = window(shifted)
    assert expected != window(unshifted), "test set-up: both samplings select the same steps"
    assert sorted(set(active), reverse=True) == expected, (
        f"{node} ({order}) acted at sigmas {sorted(set(active), reverse=True)}; the shifted sampling's window "
        f"selects {expected} (the loaded model's unshifted sampling would select {window(unshifted)})")


# --- EasyCache -----------------------------------------------------------------------------------------
def _easycache(threshold):
    def apply(model):
        EasyCache = comfy_extra("nodes_easycache", "EasyCacheNode")
        return run_node(EasyCache, model=model, reuse_threshold=threshold, start_percent=0.0, end_percent=1.0, verbose=False)[0]
    return apply


class ForwardCount:
    """Counts the diffusion model's real forward passes (block 0 runs once per pass)."""

    def __init__(self, model):
        self.block = model.get_model_object("diffusion_model").blocks[0]
        self.count = 0

    def __enter__(self):
        self.handle = self.block.register_forward_pre_hook(lambda *a: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node", sorted(OURS))
def test_easycache(wan21, node, order):
    """EasyCache that never reuses changes nothing of ours; EasyCache that reuses still skips model
    passes stacked with ours, and ours still acts on the passes that run."""
    ours = OURS[node]
    steps = 5
    with ForwardCount(wan21) as ours_passes:
        alone = sample(ours(wan21), steps=steps)
    torch.testing.assert_close(sample(stack(ours, _easycache(0.0), wan21, order), steps=steps), alone, rtol=1e-5, atol=1e-6)
    reusing = _easycache(3.0)
    with ForwardCount(wan21) as cache_passes:
        cache_only = sample(reusing(wan21), steps=steps)
    with ForwardCount(wan21) as stacked_passes:
        stacked = sample(stack(ours, reusing, wan21, order), steps=steps)
    # The plain model makes one pass per step (cond and uncond batched).
    assert cache_passes.count < steps, f"test set-up: EasyCache reused nothing ({cache_passes.count} passes in {steps} steps)"
    assert stacked_passes.count < ours_passes.count, (
        f"EasyCache skipped no pass stacked with {node} ({stacked_passes.count} vs {ours_passes.count} alone)")
    assert_effect(stacked, cache_only, f"{node} with EasyCache")
    assert torch.isfinite(stacked).all()


# --- context windows -------------------------------------------------------------------------------------
def _context_windows(model):
    ContextWindows = comfy_extra("nodes_context_windows", "ContextWindowsManualNode")
    import comfy.context_windows as cw
    return run_node(ContextWindows, model=model, context_length=5, context_overlap=2,
                    context_schedule=cw.ContextSchedules.STATIC_STANDARD, context_stride=1, closed_loop=False,
                    fuse_method=cw.ContextFuseMethods.PYRAMID, dim=2)[0]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node", sorted(OURS))
def test_context_windows(wan21, node, order, cfi_calls):
    """With context windows the model sees a slice of the latent's frames: Enhance-A-Video's frame
    count is the window's (each scale uses the frame count of the model call it runs in), and both
    methods act."""
    ours = OURS[node]
    latent = video_latent(frames=9)
    windows_only = sample(_context_windows(wan21), latent, steps=2)
    per_call = []
    recorder = ModelCalls()

    def after(record):
        per_call.append((record["frames"], list(cfi_calls)))
        cfi_calls.clear()
    recorder.after = after
    stacked = sample(recorder(stack(ours, _context_windows, wan21, order)), latent, steps=2)
    assert torch.isfinite(stacked).all()
    assert_effect(stacked, windows_only, f"{node} with context windows")
    assert recorder.calls and all(c["frames"] < 9 for c in recorder.calls), \
        f"the model saw the whole latent, not windows: {[c['frames'] for c in recorder.calls]}"
    if node == "enhance_a_video":
        tokens_per_frame = (16 // 2) * (16 // 2)
        for frames, scales in per_call:
            assert scales, "a windowed model call got no Enhance-A-Video scale"
            assert {f for f, _ in scales} == {frames}, f"model call on {frames} frames used frame counts {scales}"
            assert {n for _, n in scales} == {frames * tokens_per_frame}


# --- Wan 2.2: two experts in two KSamplerAdvanced nodes -------------------------------------------------
def wan22_experts():
    """Wan 2.2 A14B's layout: two WanModel files of the same (t2v) architecture, the high-noise and
    the low-noise expert, here tiny and with different seeds."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256,
                        text_dim=4096, out_dim=16, num_heads=2, num_layers=4, operations=comfy.ops.disable_weight_init)
    return [tiny_models._cached(f"tiny_wan22_t2v_{name}_noise.safetensors", build, seed=seed)
            for name, seed in (("high", 22), ("low", 23))]


STEPS, SWITCH, SEED = 4, 2, 5


def _advanced(model, latent, first: bool):
    """KSamplerAdvanced as Wan 2.2 graphs set it: the high-noise expert adds the noise, runs the first
    steps and returns the leftover noise; the low-noise expert continues without adding noise."""
    return run_node(nodes.KSamplerAdvanced, model=model, add_noise="enable" if first else "disable", noise_seed=SEED,
                    steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple", positive=POS, negative=NEG,
                    latent_image=latent, start_at_step=0 if first else SWITCH, end_at_step=SWITCH if first else 10000,
                    return_with_leftover_noise="enable" if first else "disable")[0]["samples"]


def _continue(low, handover):
    return _advanced(low, {"samples": handover}, first=False)


def _two_experts(high, low, latent):
    """(hand-over latent, final latent); low None: the high-noise expert's part only."""
    handover = _advanced(high, latent, first=True)
    return handover, None if low is None else _continue(low, handover)


@pytest.mark.parametrize("node", sorted(OURS))
def test_wan22_two_experts(node, caplog):
    ours = OURS[node]
    high, low = (tiny_models.load_diffusion_model(p) for p in wan22_experts())
    latent = video_latent(frames=5)
    plain = _two_experts(high, low, latent)
    with caplog.at_level(logging.INFO):
        handover, final = _two_experts(ours(high), ours(low), latent)
    plain_low = _continue(low, handover)
    assert_effect(handover, plain[0], f"{node} on the high-noise expert")
    assert_effect(final, plain_low, f"{node} on the low-noise expert")
    if node == "entropy_guidance":
        # One registry per sampling run: each expert measures its own layers at its own first step.
        assert sum("IE-Adapt: layer(s)" in r.getMessage() for r in caplog.records) >= 2
    # Each expert patched on its own, from freshly loaded files, with the same hand-over latent.
    fresh_high, fresh_low = (tiny_models.load_diffusion_model(p) for p in wan22_experts())
    alone_high = _two_experts(ours(fresh_high), None, latent)[0]
    alone_low = _continue(ours(fresh_low), handover)
    torch.testing.assert_close(alone_high, handover, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone_low, final, rtol=1e-5, atol=1e-6)
