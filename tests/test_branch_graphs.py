"""The methods that add batch elements or hook modules, in the graphs users build, through ComfyUI's
real samplers, batching and nodes on tiny models: context windows (guidance and EVS feature
injection), a positive of two entries (ConditioningCombine) with the batch split by ComfyUI's own
memory estimate or over multi-GPU work units, Wan variants whose blocks read batch-sized tensors from
outside their arguments (HuMo, WanAnimate2), and module patches that another clone of the model left
in place.

The docstrings give what each test measured on the code it was written against (commit 8924ba3,
ComfyUI 0.3.75 unless said): the defect it failed for, or that it passed there.
"""

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import nodes
from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.entropy_guidance import apply_entropy_guidance
from freevideo.enhance_core.methods.evs.sampler import Stage, evs_sample
from freevideo.enhance_core.methods.feature_accumulation import apply_feature_accumulation
from freevideo.enhance_core.models import adapter_for
from freevideo.enhance_core.patching.attention_slot import add_attention_override
from support import tiny_image_models, tiny_models
from support.deep_clones import forget_released_patchers, fresh_wan, two_cpu_devices_work_units
from support.node_calls import run_node
from support.sampling import ksample, text_conditioning, video_latent

POS, NEG, POS_B = text_conditioning(seed=1), text_conditioning(seed=2), text_conditioning(seed=3)
# Results count as equal when they differ by less than this: float32 sums over other batch sizes or
# windows differ by ~1e-6 here; each method moves the results by more than 0.05.
NOISE = 1e-4
SMALL = dict(frames=3, height=8, width=8)  # 3 latent frames of 4 x 4 tokens
GUIDED_LAYER = "2"  # of 4: the guidance branches share blocks 0-1 with the element they copy


def max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


def assert_same(result, reference, what):
    assert max_diff(result, reference) < NOISE, f"{what}: differs from the reference by {max_diff(result, reference):.3g}"


def assert_acts(result, plain, what):
    assert max_diff(result, plain) > 0.05, f"{what} must act for the comparison to mean something"


def forwards(model):
    """A clone that records the conds (cond_or_uncond) of every forward ComfyUI makes."""
    m = model.clone()
    conds = []

    def record(executor, x, *args, **kwargs):
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else args[4]
        conds.append(list(options["cond_or_uncond"]))
        return executor(x, *args, **kwargs)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_forwards", record)
    return m, conds


def guided(model, layers=GUIDED_LAYER):
    return apply_entropy_guidance(model, 2.0, layers=layers)


@pytest.fixture(scope="module")
def wan():
    return fresh_wan()


# --- 3. context windows --------------------------------------------------------------------------
# ComfyUI's ContextWindowsManual node: the model sees windows of 2 of the latent's 3 frames
# (overlap 1), and every batch element, branches included, must be cut to the window.
CLIP_FRAMES = 3
WINDOW = 2


def context_windows(model, whole_clip=False):
    """ContextWindowsManual over the frame axis of Wan's latent, windows of 2 frames. whole_clip: the
    handler's schedule is one window over every frame (the windows path, which ComfyUI takes for
    clips longer than the context length, with nothing cut)."""
    try:
        from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    except ImportError:
        pytest.skip("this ComfyUI has no context windows (comfy_extras/nodes_context_windows.py)")
    import comfy.context_windows as cw
    (windowed,) = run_node(ContextWindowsManualNode, model=model, context_length=WINDOW, context_overlap=1,
                         context_schedule=cw.ContextSchedules.STATIC_STANDARD, fuse_method=cw.ContextFuseMethods.PYRAMID, dim=2)
    if whole_clip:
        windowed.model_options["context_handler"].context_schedule = cw.ContextSchedule(
            "whole clip", lambda frames, handler, model_options: [list(range(frames))])
    return windowed


def windowed_calls(model):
    """A clone recording each forward: the latent frames it sees (its window's, in newer ComfyUI with
    the anchor frame it prepends), its conds, and the q, k of each attention kernel call in it as the
    kernel receives them (overrides installed after this one wrap it)."""
    m = model.clone()
    calls = []

    def forward(executor, x, t, *args, **kwargs):
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else args[3]
        window = options.get("context_window")
        frames = None if window is None else \
            window.get_tensor(torch.arange(CLIP_FRAMES).view(1, 1, CLIP_FRAMES), dim=2).flatten().tolist()
        calls.append(dict(frames=frames, latent_frames=x.shape[2], sigma=float(t.max()),
                          conds=list(options.get("cond_or_uncond") or [0]), kernels=[]))
        return executor(x, t, *args, **kwargs)

    def kernel(call_next, q, k, v, heads, **kwargs):
        calls[-1]["kernels"].append((q, k))
        return call_next(q, k, v, heads, **kwargs)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_windowed_calls", forward)
    add_attention_override(m, "test_windowed_kernels", kernel)
    return m, calls


def assert_cut_to_windows(calls):
    """Every forward ran on its window's frames (all its batch elements: they share one latent), and
    the windows cut the clip."""
    assert all(c["frames"] is not None and c["latent_frames"] == len(c["frames"]) for c in calls), \
        [(c["frames"], c["latent_frames"]) for c in calls]
    assert min(len(c["frames"]) for c in calls) < CLIP_FRAMES


WINDOW_ORDERS = ["context windows before guidance", "context windows after guidance"]


def guided_windowed(model, order, whole_clip=False):
    windows = lambda m: context_windows(m, whole_clip)  # noqa: E731
    return guided(windows(model)) if order == WINDOW_ORDERS[0] else windows(guided(model))


def sample_clip(model):
    return ksample(model, video_latent(frames=CLIP_FRAMES, height=8, width=8), POS, NEG, steps=2, cfg=4.0)


@pytest.mark.parametrize("order", WINDOW_ORDERS)
def test_guidance_with_context_windows(order, wan):
    """Either node order: every forward (cond, uncond and the guidance branches) sees the frames of one
    window, and the guidance acts; one window over the whole clip gives the result without windows.
    (Passes on the code it was written against: the branches copy the step's conds, which ComfyUI
    cuts to the window.)"""
    recorded, calls = windowed_calls(wan)
    windowed = sample_clip(guided_windowed(recorded, order))
    assert any({2, 3} & set(c["conds"]) for c in calls), "the guidance branches never ran"
    assert_cut_to_windows(calls)
    assert torch.isfinite(windowed).all()
    assert_acts(windowed, sample_clip(context_windows(wan)), "the guidance")
    whole = sample_clip(guided_windowed(wan, order, whole_clip=True))
    assert_same(whole, sample_clip(guided(wan)), f"{order}, one window over the clip")


SFI_LAYER = 1


def evs_with_sfi(video_model):
    """EVS with feature injection on layer 1 over a Wan video of 3 latent frames of 2 x 2 (tiny SD1.5
    image model and TAESD, the pixel bridge through the tiny Wan VAE): DDIM inversion of the video up
    to level 2 of 4, then one video step at CFG 2."""
    image = Stage(tiny_image_models.sd15_unet(), text_conditioning(dim=tiny_image_models.SD15_CONTEXT_DIM, seed=1),
                  text_conditioning(dim=tiny_image_models.SD15_CONTEXT_DIM, seed=2), 1.0, "euler", "simple", 2)
    video = Stage(video_model, POS, NEG, 2.0, "euler", "simple", 4)
    clip = {"samples": torch.randn(1, 16, CLIP_FRAMES, 2, 2, generator=torch.Generator().manual_seed(7))}
    out, _ = evs_sample(image, video, clip, 0.5, 1, 2, 1, seed=4, image_vae=tiny_image_models.taesd_vae(),
                        video_vae=tiny_models.load_vae(tiny_models.wan21_vae()), sfi=True, sfi_layers=str(SFI_LAYER),
                        sfi_gamma=0.5)
    return out["samples"]


def test_evs_feature_injection_with_context_windows(wan):
    """The context-windows node on the video model (EVS takes the models and returns a latent, so it
    can only come before). The inversion runs window by window; in the video step each window must
    get the keys the inversion recorded for its own frames at its level (layer 1: K_inv in every
    row). One window over the whole clip gives the result without windows.

    Measured on the code this was written against: window [0, 1] got the keys of window [1, 2] (off
    by 0.07 and 0.10 at the two levels, keys up to 3.9); on 0.33, whose second window carries an
    anchor frame ([0, 1, 2]), window [0, 1] got no injection at all (its keys off by 1.3 and 3.3).
    One window over the clip: equal."""
    recorded, calls = windowed_calls(wan)
    evs_with_sfi(context_windows(recorded))
    self_attention = 2 * SFI_LAYER  # Wan: a self- then a cross-attention kernel call per block
    inversion = {(tuple(c["frames"]), c["sigma"]): c for c in calls if c["conds"] == [0]}
    steps = [c for c in calls if sorted(c["conds"]) == [0, 1]]
    assert steps
    assert_cut_to_windows(calls)
    assert_same(evs_with_sfi(context_windows(wan, whole_clip=True)), evs_with_sfi(wan), "one window over the clip")
    for c in steps:
        source = inversion.get((tuple(c["frames"]), c["sigma"]))
        assert source is not None, f"no inversion forward on frames {c['frames']} at sigma {c['sigma']:.4g}"
        k_seen, k_inv = c["kernels"][self_attention][1], source["kernels"][self_attention][1]
        off = max_diff(k_seen, k_inv.expand_as(k_seen)) if k_seen.shape[1:] == k_inv.shape[1:] else float("inf")
        assert off < NOISE, \
            f"window {c['frames']} at sigma {c['sigma']:.4g}: layer {SFI_LAYER}'s keys are off the inversion's by {off:.3g}"


# --- 4. shared-prefix guidance with two entries per cond ------------------------------------------
# A two-entry positive at CFG 4 with the two guidance branches (uniform, identity), each a copy of
# the positive: c0, c1, n0, U-c0, U-c1, I-c0, I-c1, 7 batch elements per step.
ELEMENTS = 7


def two_entry_positive():
    """A positive of two entries, as ConditioningCombine makes it: ComfyUI evaluates each entry as
    its own batch element and averages their predictions."""
    return nodes.ConditioningCombine().combine(POS, POS_B)[0]


def sample_two_entries(model):
    return ksample(model, video_latent(**SMALL), two_entry_positive(), NEG, steps=2, cfg=4.0)


def memory_for(monkeypatch, model, elements: int):
    """Make ComfyUI's memory check fit `elements` batch elements and no more: free memory is
    (elements + 1/2) times the model's own estimate for one element (its estimate is linear in the
    batch, and ComfyUI batches while estimate x 1.5 < free). 0.3.75 asks comfy.model_management for
    free memory, newer ComfyUI the patcher."""
    one = model.model.memory_required([1] + list(video_latent(**SMALL)["samples"].shape[1:]))
    free = 1.5 * one * (elements + 0.5)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: free)
    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda *a, **k: free)


@pytest.fixture(scope="module")
def unsplit(wan):
    """The guided result with all 7 elements in one forward."""
    with pytest.MonkeyPatch.context() as mp:
        memory_for(mp, wan, ELEMENTS)
        model, conds = forwards(guided(wan))
        result = sample_two_entries(model)
    assert max(map(len, conds)) == ELEMENTS, conds
    assert_acts(result, sample_two_entries(wan), "the guidance")
    return result


@pytest.mark.parametrize("capacity", [2, 3, 4, 5, 6])
def test_shared_prefix_with_a_two_entry_positive_under_every_batch_split(capacity, wan, unsplit, monkeypatch):
    """ComfyUI splits the 7 elements by its memory estimate (here: memory for `capacity` of them), so
    a branch entry may share a forward with both entries of the cond, one of them, or neither. The
    guided result equals the unsplit one.

    Measured on the code this was written against: memory for 4, 5 or 6 elements puts
    [U-c0, n0, c1, c0] in one forward and the shared prefix copied cond 0's two rows into U-c0's one
    row: RuntimeError shape mismatch at the first step (both ComfyUI versions); 2 and 3 were within
    2.5e-5 of the unsplit result (the guidance moves it by 3.7)."""
    memory_for(monkeypatch, wan, capacity)
    model, conds = forwards(guided(wan))
    split = sample_two_entries(model)
    assert max(map(len, conds)) <= capacity, f"the batch was not split as set up: forwards of {conds}"
    assert_same(split, unsplit, f"memory for {capacity} of {ELEMENTS} elements")


def test_shared_prefix_with_a_two_entry_positive_on_multigpu_work_units(wan, unsplit, monkeypatch):
    """ComfyUI's MultiGPU_WorkUnits node and thread pool, two CPU devices standing in for two GPUs:
    ComfyUI deals the 7 elements to the devices from the front, 4 per device, so device 0 runs
    [c0, c1, n0, U-c0] and device 1 the rest. The guided result equals the single-device one.

    Measured on 0.33 with the code this was written against: RuntimeError shape mismatch (cond 0's
    [2, 48, 256] hidden state into U-c0's one row) at the first step."""
    MultiGPUCFGSplitNode = two_cpu_devices_work_units(monkeypatch)
    model, conds = forwards(guided(wan))
    forget_released_patchers()
    split = sample_two_entries(MultiGPUCFGSplitNode.execute(model, 2)[0])
    assert sorted(map(sorted, conds[:2])) == [[0, 0, 1, 2], [2, 3, 3]], \
        f"the work units were not dealt as set up: {conds[:2]}"
    assert_same(split, unsplit, "two devices")


# --- 5. shared prefix on Wan variants that feed blocks from outside their arguments ----------------
# ComfyUI's block-replace point hands a patch the block's arguments (img, txt, vec, pe); HuMo's block
# also reads the audio tokens, and WanAnimate2's the pose branch's keys and values and its attention
# buffers, from the model's forward: all sized for the whole batch. (WanAnimate, the first version,
# adds its face features between blocks, to the whole batch: not such a variant.)
WAN_SIZE = dict(patch_size=(1, 2, 2), dim=256, ffn_dim=512, freq_dim=256, text_dim=4096, out_dim=16, num_heads=2,
                num_layers=2)


def tiny_wan_variant(name, build, config=None):
    """A tiny Wan variant from ComfyUI's own class, saved with its real key names (and the config
    metadata a checkpoint carries where ComfyUI reads the variant from it) and loaded through
    ComfyUI's loader."""
    return tiny_models.load_diffusion_model(tiny_models._cached(name, build, config=config))


def humo():
    """HuMo (audio-driven Wan): 2 blocks of width 256 and the audio projection at the fixed size
    ComfyUI builds it with; the conditioning from ComfyUI's WanHuMoImageToVideo node with a stand-in
    audio encoder output (33 layers of 1280 features, 50 per second, one second)."""
    import comfy.ops
    from comfy.ldm.wan.model import HumoWanModel
    from comfy_extras.nodes_wan import WanHuMoImageToVideo
    model = tiny_wan_variant("tiny_wan21_humo.safetensors", lambda: HumoWanModel(
        in_dim=16, operations=comfy.ops.disable_weight_init, **WAN_SIZE))
    g = torch.Generator().manual_seed(5)
    audio = {"encoded_audio_all_layers": [torch.randn(1, 50, 1280, generator=g) for _ in range(33)], "audio_samples": 16000}
    positive, negative, latent = WanHuMoImageToVideo.execute(POS, NEG, None, 32, 32, 9, 1, audio_encoder_output=audio).result
    return model, positive, negative, latent


def animate2():
    """WanAnimate2 (newer ComfyUI): 2 blocks of width 256 with the I2V image embedding it loads; the
    conditioning (pose video, reference image) from ComfyUI's WanAnimate2ToVideo node with the tiny
    Wan VAE."""
    try:
        from comfy.ldm.wan.model_animate2 import WanAnimate2Model
        from comfy_extras.nodes_wan import WanAnimate2ToVideo
    except ImportError:
        pytest.skip("this ComfyUI has no WanAnimate2 (comfy/ldm/wan/model_animate2.py)")
    import comfy.ops
    model = tiny_wan_variant("tiny_wan_animate2.safetensors", lambda: WanAnimate2Model(
        in_dim=36, operations=comfy.ops.disable_weight_init, **WAN_SIZE), config={"transformer": {"model_type": "animate2"}})
    g = torch.Generator().manual_seed(6)
    vae = tiny_models.load_vae(tiny_models.wan21_vae())
    positive, negative, latent = WanAnimate2ToVideo.execute(
        POS, NEG, vae, 32, 32, 5, 1, 0, reference_image=torch.rand(1, 32, 32, 3, generator=g),
        pose_video=torch.rand(5, 32, 32, 3, generator=g)).result[:3]
    return model, positive, negative, latent


VARIANTS = {"HumoWanModel": humo, "WanAnimate2Model": animate2}


def block_rows(model, block: int):
    """A clone whose block `block` records the batch size of its hidden state at every call, from a
    block-replace patch (a shared-prefix patch set later runs it inside, on the rows it keeps)."""
    m = model.clone()
    rows = []

    def replace(args, extra):
        rows.append(args["img"].shape[0])
        return extra["original_block"](args)
    m.set_model_patch_replace(replace, "dit", "double_block", block)
    return m, rows


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shared_prefix_on_variants_with_batch_sized_block_inputs(variant, monkeypatch):
    """Guidance on layer 1 as the node samples it (sharing block 0 with the cond where it takes the
    shared prefix) and with full branches (the adapter's prefix points turned off): the results are
    equal.

    WanAnimate2 with a pose video computes each layer's attention frame by frame (queries split over
    several kernel calls), where the guidance leaves the layer alone: there the test checks that the
    guided sampling runs and gives the full branches' result.

    Measured on the code this was written against: HuMo differs by 14.9 (both ComfyUI versions; the
    guidance moves the result by 3.1); WanAnimate2 (0.33) raises RuntimeError (pose keys of 4 rows
    expanded into buffers of 2)."""
    model, positive, negative, latent = VARIANTS[variant]()
    assert type(model.get_model_object("diffusion_model")).__name__ == variant

    def sample_guided():
        m, rows = block_rows(model, 0)
        m, conds = forwards(guided(m, layers="1"))
        return ksample(m, latent, positive, negative, steps=2, cfg=4.0), conds, rows
    shared, conds, _ = sample_guided()
    assert all(sorted(c) == [0, 1, 2, 3] for c in conds), f"set-up: cond, uncond and both branches in one forward: {conds}"
    monkeypatch.setattr(type(adapter_for(model)), "prefix_points", lambda self, diffusion_model: None)
    full, _, full_rows = sample_guided()
    assert set(full_rows) == {4}
    if variant == "HumoWanModel":
        assert_acts(full, ksample(model, latent, positive, negative, steps=2, cfg=4.0), "the guidance")
    assert torch.isfinite(shared).all()
    assert_same(shared, full, "shared prefix vs full branches")


# --- 7. module patches another clone left in place ----------------------------------------------
class Wrap(torch.nn.Module):
    """A neighbour's attention wrapper, as packs that swap attention write one: the original module
    is its child and it calls it (here unchanged, and counted)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


WRAPPED = "diffusion_model.blocks.1.self_attn"


def wrapped(model):
    """The neighbour node: a clone whose layer-1 self-attention is object-patched with a Wrap."""
    m = model.clone()
    m.add_object_patch(WRAPPED, Wrap(m.get_model_object(WRAPPED)))
    return m


METHODS = {
    "enhance_a_video": lambda m: apply_enhance_a_video(m, 40.0),
    "entropy_guidance": lambda m: guided(m, layers="1"),
    "feature_accumulation": lambda m: apply_feature_accumulation(m, gate="0.3", group_size=2),
}


def sample_small(model):
    return ksample(model, video_latent(**SMALL), POS, NEG, steps=2, cfg=4.0)


@pytest.fixture(scope="module")
def untouched():
    """Each method's result on a freshly loaded model that no other clone has patched."""
    model = fresh_wan()
    plain = sample_small(model)
    results = {name: sample_small(method(model)) for name, method in METHODS.items()}
    for name, result in results.items():
        assert_acts(result, plain, name)
    return results


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_wrapper_another_clone_left_loaded_does_not_reach_ours(method, untouched):
    """A neighbour wraps layer 1's self-attention on one clone, which samples and stays loaded (its
    object patch is applied in place on the shared model). Ours, applied to the unpatched model in
    another branch of the graph, acts as on a model never touched.

    Measured on the code this was written against (both ComfyUI versions): Enhance-A-Video and the
    guidance raised AttributeError 'Wrap' object has no attribute 'norm_q' when the node executed;
    feature accumulation (it hooks the block and its norm1) gave the untouched result."""
    model = fresh_wan()
    neighbour = wrapped(model)
    sample_small(neighbour)
    assert neighbour.object_patches[WRAPPED].calls > 0
    assert_same(sample_small(METHODS[method](model)), untouched[method], f"{method} after a wrapped clone sampled")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ours_acts_through_a_wrapper_applied_before_it(method, untouched):
    """The neighbour's wrapper node placed before ours: the wrapper keeps the original module as its
    child, so ours acts on that module through it. The wrapper runs, and as it changes nothing
    itself, the result equals ours on the plain model.

    Measured on the code this was written against: on 0.3.75 Enhance-A-Video and the guidance raised
    AttributeError 'Wrap' object has no attribute 'norm_q' when the model loaded for sampling; on
    0.33 they left layer 1 alone (off by 11.9 and 3.7, the guidance's whole effect). Feature
    accumulation: equal."""
    neighbour = wrapped(fresh_wan())
    ours = sample_small(METHODS[method](neighbour))
    assert neighbour.object_patches[WRAPPED].calls > 0, "the neighbour's wrapper did not run"
    assert_same(ours, untouched[method], f"{method} on a wrapped layer 1")
