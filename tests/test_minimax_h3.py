"""MiniMax H3 (ComfyUI 0.33's comfy/ldm/minimax, MiniMaxH3Model): what is special to its packed
sequence, by value, on the tiny model through ComfyUI's loader, conditioning and KSampler.

One unbatched sequence per model call: text, keyframe rows (fl2va), target audio, target video
last. Only the target video rows are "the video" (latent_t frames; keyframes are other tokens):
they alone are measured and scaled, at the attention module's output. q/k reach the kernel from
ComfyUI's fused in-place RMS-norm + rope kernel (q_norm never runs). The model takes one batch
element per call, so guidance and editing branches run as model calls of their own.

Skips on a ComfyUI without the family (0.3.75)."""

import pytest
import torch

from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.entropy_editing import EntropyEditing
from freevideo.enhance_core.methods.entropy_guidance import EntropyGuidance
from freevideo.enhance_core.models import adapter_for
from freevideo.enhance_core.patching.attention_slot import add_attention_override
from freevideo.enhance_core.patching.layer_routing import SelfAttentionLayers
from support.families import BY_ID, FRAMES, conditioning, flat, latent, load
from support.reference import naive_entropy, naive_scale
from support.sampling import ksample

pytestmark = pytest.mark.families

FAM = BY_ID["minimax_h3"]
VIDEO_ROWS = FRAMES * (FAM.size // 2) ** 2  # patch (1, 2, 2)
WEIGHT = 6.0


@pytest.fixture(scope="module")
def model():
    return load(FAM)  # skips where this ComfyUI has no MiniMax H3


def with_keyframe(cond, frame=0, seed=7):
    """cond with one keyframe latent at pixel frame `frame`, as MiniMaxH3ImageToVideo attaches it."""
    g = torch.Generator().manual_seed(seed)
    keyframe = {"resolved_frame_index": frame, "latent": torch.randn(1, FAM.channels, 1, FAM.size, FAM.size, generator=g)}
    return [[t, dict(extras, minimax_keyframes=[keyframe])] for t, extras in cond]


def record_layouts(clone, into):
    """Every model call's packed layout, as the model receives it (minimax_payload)."""
    def around(executor, x, *args, **kwargs):
        into.append(kwargs["minimax_payload"]["layout"])
        return executor(x, *args, **kwargs)
    clone.add_wrapper_with_key("diffusion_model", "test_layouts", around)


def run(model, positive=None, steps=1):
    positive = conditioning(FAM, 1) if positive is None else positive
    return flat(ksample(model, latent(FAM), positive, conditioning(FAM, 2), steps=steps, cfg=3.0))


@pytest.mark.parametrize("keyframe", [False, True], ids=["t2va", "fl2va"])
def test_routed_video_span_is_the_layouts_video_segment(model, keyframe):
    """Every routed call's video tokens are exactly the layout's target video segment, the last rows,
    FRAMES frames: keyframe rows are not counted as frames."""
    clone = model.clone()
    layouts, calls = [], []
    record_layouts(clone, layouts)

    def handler(call):
        calls.append((call.layer, call.seq_len, call.video))
        return call.run()
    SelfAttentionLayers(clone, adapter_for(clone), "test_recorder", "test recorder").route([0, 1], handler)
    positive = with_keyframe(conditioning(FAM, 1)) if keyframe else None
    run(clone, positive)
    assert len(layouts) == 2 and len(calls) == 4  # cond and uncond, one model call each, 2 layers
    kinds = [[kind for _, _, kind in layout.segments] for layout in layouts]
    assert kinds[0] == ["text"] + (["cond"] if keyframe else []) + ["audio", "video"]
    for layer, seq_len, video in calls:
        layout = layouts[0] if seq_len == layouts[0].seq_len else layouts[1]
        start, stop, _ = next(s for s in layout.segments if s[2] == "video")
        assert (video.start, video.stop, video.frames) == (start, stop, FRAMES)
        assert stop == seq_len and stop - start == VIDEO_ROWS


class KernelRecorder:
    """A clone whose kernel calls inside blocks.{layer}.attn are recorded (q, k, output) below any
    node applied to it later, with that module's output (after the node's scale)."""

    def __init__(self, model, layer):
        self.clone = model.clone()
        self.calls, self.outputs = [], []
        self.attn = model.get_model_object(f"diffusion_model.blocks.{layer}.attn")
        self._inside = False
        add_attention_override(self.clone, "test_recorder", self._record)
        self._handles = [self.attn.register_forward_pre_hook(lambda m, a, k: setattr(self, "_inside", True), with_kwargs=True),
                         self.attn.register_forward_hook(self._leave)]

    def _record(self, call_next, q, k, v, heads, *args, **kwargs):
        out = call_next(q, k, v, heads, *args, **kwargs)
        if self._inside:
            assert kwargs.get("skip_reshape") and q.shape[0] == 1
            self.calls.append((q.transpose(1, 2), k.transpose(1, 2), out.clone()))  # [1, S, H, D]
        return out

    def _leave(self, module, args, out):
        self._inside = False
        self.outputs.append(out.clone())

    def remove(self):
        for h in self._handles:
            h.remove()


def test_scale_acts_on_the_target_video_rows_only(model):
    """Layer 1 of one real step, cond and uncond (one model call each), with a keyframe: the
    attention module's output [rows, hidden] is out_proj(kernel output) with its last VIDEO_ROWS
    rows times the naive official scale of those rows' q and k, and every other row (text,
    keyframe, audio) exactly out_proj(kernel output)."""
    rec = KernelRecorder(model, 1)
    try:
        run(apply_enhance_a_video(rec.clone, weight=WEIGHT, layers="1"), with_keyframe(conditioning(FAM, 1)))
    finally:
        rec.remove()
    assert len(rec.calls) == len(rec.outputs) == 2
    scales = []
    for (q, k, out), got in zip(rec.calls, rec.outputs):
        video = slice(q.shape[1] - VIDEO_ROWS, None)
        want = naive_scale(q[:, video], k[:, video], FRAMES, WEIGHT)
        assert want.min() > 1.0
        scales.append(want)
        with torch.no_grad():
            projected = rec.attn.out_proj(out.squeeze(0))
        torch.testing.assert_close(got[video], projected[video] * want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[:video.start], projected[:video.start])
        assert not torch.allclose(got[video], projected[video], rtol=1e-3, atol=1e-5)
    assert not torch.equal(scales[0], scales[1])  # cond and uncond each their own


def test_q_and_k_come_from_the_fused_norm_rope_kernel(model, monkeypatch):
    """The path exercised is ComfyUI's fused in-place RMS-norm + rope kernel (comfy_kitchen, eager
    on CPU): called once per layer and model call, q_norm never runs, and Enhance-A-Video acts."""
    import comfy.quant_ops
    fused = []
    kernel = comfy.quant_ops.ck.rms_rope_split_half_

    def counting(*args, **kwargs):
        fused.append(1)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(comfy.quant_ops.ck, "rms_rope_split_half_", counting)
    dm = model.get_model_object("diffusion_model")
    norms = []
    handles = [block.attn.q_norm.register_forward_hook(lambda m, a, o: norms.append(1)) for block in dm.blocks]
    try:
        plain = run(model)
        assert len(fused) == 2 * len(dm.blocks) and not norms
        enhanced = run(apply_enhance_a_video(model, weight=WEIGHT))
    finally:
        for h in handles:
            h.remove()
    assert len(fused) == 4 * len(dm.blocks) and not norms
    assert not torch.equal(plain, enhanced)


def test_guidance_branches_run_alone_and_the_registry_equals_a_naive_entropy(model):
    """Every model call holds one batch element (the model raises on more): the two branches run as
    calls of their own. The registry's entropy of each layer is the naive softmax entropy of the
    cond's video rows over the video keys, from the q and k of the same call."""
    g = EntropyGuidance(guided := model.clone(), 2.0, top_k=1)
    m = guided.clone()
    calls = []

    def record(call_next, q, k, v, heads, **kwargs):
        calls.append(dict(q=q, k=k, groups=list(kwargs["transformer_options"]["cond_or_uncond"])))
        return call_next(q, k, v, heads, **kwargs)
    add_attention_override(m, "test_recorder", record)
    guided = run(m)
    assert torch.isfinite(guided).all() and not torch.equal(guided, run(model))
    assert all(c["groups"] in ([0], [1], [2], [3]) and c["q"].shape[0] == 1 for c in calls)
    assert sorted({c["groups"][0] for c in calls}) == [0, 1, 2, 3]
    first_cond = [c for c in calls if c["groups"] == [0]][:2]  # the measured pass: layers 0 and 1
    video = slice(-VIDEO_ROWS, None)
    for layer, c in enumerate(first_cond):
        want = float(naive_entropy(c["q"][:, :, video], c["k"][:, :, video]).mean())
        assert g.last_run.entropies[layer] == pytest.approx(want, abs=1e-4)


def test_editing_sources_run_first_and_no_target_is_replayed(model):
    """Each source (the source prompt's, and the negative's copy) runs in a model call of its own
    before its target, so every target finds its source's q and k: nothing evaluated twice."""
    editing = EntropyEditing(patched := model.clone(), conditioning(FAM, 4), ratio=1.0)
    edited = run(patched, steps=2)
    assert torch.isfinite(edited).all() and not torch.equal(edited, run(model, steps=2))
    assert editing.last_run.replays == 0 and not editing.last_run.missed
