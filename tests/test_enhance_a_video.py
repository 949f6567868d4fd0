"""Enhance-A-Video through ComfyUI's real model patcher and samplers, on tiny models."""

import pytest
import torch

from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from support.sampling import force_unbatched, ksample, text_conditioning, video_latent


def sample(model, latent=None, **kw):
    latent = latent or video_latent(frames=5)
    return ksample(model, latent, text_conditioning(seed=1), text_conditioning(seed=2), **kw)


def test_changes_output_and_leaves_input_model_untouched(wan21):
    before = sample(wan21)
    enhanced = sample(apply_enhance_a_video(wan21, weight=40.0))
    after = sample(wan21)
    assert not torch.equal(before, enhanced)
    assert torch.equal(before, after)


@pytest.mark.parametrize("kwargs", [
    dict(weight=0.0),
    dict(weight=40.0, start_percent=1.0, end_percent=1.0),
])
def test_off_settings_are_bit_identical(wan21, kwargs):
    assert torch.equal(sample(wan21), sample(apply_enhance_a_video(wan21, **kwargs)))


def test_single_frame_is_a_no_op(wan21):
    latent = video_latent(frames=1)
    assert torch.equal(sample(wan21, latent), sample(apply_enhance_a_video(wan21, weight=40.0), latent))


def test_unsupported_model_names_the_supported_families():
    import comfy.model_patcher
    import comfy.model_base

    class NotVideo(torch.nn.Module):
        pass
    base = comfy.model_base.BaseModel.__new__(comfy.model_base.BaseModel)
    torch.nn.Module.__init__(base)
    base.diffusion_model = NotVideo()
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="Supported families: Wan"):
        apply_enhance_a_video(patcher, 4.0)


@pytest.mark.parametrize("layers,message", [("0-9", "layer 9 does not exist"), ("x", "cannot read 'x'"), ("3-1", "backwards")])
def test_bad_layer_list(wan21, layers, message):
    with pytest.raises(ValueError, match=message):
        apply_enhance_a_video(wan21, 4.0, layers=layers)


@pytest.mark.parametrize("reference", [0, 3])
def test_scale_inside_the_model_equals_the_official_formula(wan21, reference):
    """Layer 1 of a real sampling step: its self-attention output (after the projection) equals the
    projected kernel output times the naive official scale, per batch element (cond and uncond).
    With reference_latent_frames R, the weight in that formula is weight * F / R."""
    from freevideo.enhance_core.patching.attention_slot import add_attention_override
    from support.reference import naive_scale

    recorder = wan21.clone()
    kernel_calls = []

    def record(call_next, q, k, v, heads, **kwargs):
        out = call_next(q, k, v, heads, **kwargs)
        kernel_calls.append((q, k, out, heads))
        return out
    add_attention_override(recorder, "test_recorder", record)
    patched = apply_enhance_a_video(recorder, weight=6.0, layers="1", reference_latent_frames=reference)

    self_attn = wan21.get_model_object("diffusion_model.blocks.1.self_attn")
    outputs = []
    handle = self_attn.register_forward_hook(lambda mod, inp, out: outputs.append(out.clone()))
    try:
        sample(patched, steps=1, cfg=3.0)
    finally:
        handle.remove()
    assert len(outputs) == 1, "cond and uncond should run as one batch of 2 here"
    # Kernel calls run self, cross per block: block 1's self-attention is the third. Its input
    # depends on the text (through block 0's cross-attention), so cond and uncond differ.
    q, k, attn, heads = kernel_calls[2]
    assert q.shape[0] == 2
    b, n, _ = q.shape
    frames = 5
    weight = 6.0 if reference == 0 else 6.0 * frames / reference
    want_scale = naive_scale(q.view(b, n, heads, -1), k.view(b, n, heads, -1), frames, weight)
    assert want_scale.min() > 1.0 and not torch.equal(want_scale[0], want_scale[1])
    projected = torch.nn.functional.linear(attn, self_attn.o.weight, self_attn.o.bias)
    torch.testing.assert_close(outputs[0], projected * want_scale.view(-1, 1, 1), rtol=1e-5, atol=1e-6)


def test_result_does_not_depend_on_cond_uncond_batching(wan21, monkeypatch):
    from freevideo.enhance_core.patching.attention_slot import add_attention_override
    recorder = wan21.clone()
    batch_sizes = []

    def record(call_next, q, k, v, heads, **kwargs):
        batch_sizes.append(q.shape[0])
        return call_next(q, k, v, heads, **kwargs)
    add_attention_override(recorder, "test_recorder", record)
    patched = apply_enhance_a_video(recorder, weight=40.0)
    batched_plain, batched = sample(wan21), sample(patched)
    assert set(batch_sizes) == {2}
    batch_sizes.clear()
    force_unbatched(monkeypatch)
    separate_plain, separate = sample(wan21), sample(patched)
    assert set(batch_sizes) == {1}
    plain_gap = (batched_plain - separate_plain).abs().max()
    assert (batched - separate).abs().max() <= max(plain_gap * 10, 1e-5)


def test_latent_batch_of_two_matches_batch_of_one(wan21):
    # The kernels' reduction order depends on the batch size: the plain model's own gap between
    # batch 2 and batch 1 is the float noise the patched gap is measured against.
    patched = apply_enhance_a_video(wan21, weight=40.0)
    gaps = []
    for model in (wan21, patched):
        one = sample(model, video_latent(frames=5, batch=1))
        two = sample(model, video_latent(frames=5, batch=2))
        gaps.append(float((two[:1] - one).abs().max()))
    assert gaps[1] <= max(gaps[0] * 10, 1e-5), gaps


def test_patched_clone_built_after_another_clone_sampled(wan21):
    """A clone patched while another patched clone is loaded wraps the original modules, not the
    other clone's hooked copies: two applications stack only when the user chains them."""
    a = apply_enhance_a_video(wan21, weight=40.0)
    first = sample(a)
    b = apply_enhance_a_video(wan21, weight=40.0)
    assert torch.equal(sample(b), first)
    assert torch.equal(sample(a), first)


@pytest.mark.parametrize("frames", [2, 5, 9, 21])
def test_per_length_weight_keeps_the_even_attention_scale(frames):
    """Evenly spread temporal attention (all logits equal: CFI = 1/F): the paper's scale is
    1 + weight / F, the per-length rule's 1 + weight / R at every F."""
    from freevideo.enhance_core.measures.cross_frame_intensity import enhance_scale
    from freevideo.enhance_core.methods.enhance_a_video import weight_for_length
    q = torch.zeros(2, frames * 3, 2, 8)
    k = torch.randn(2, frames * 3, 2, 8, generator=torch.Generator().manual_seed(frames))
    torch.testing.assert_close(enhance_scale(q, k, frames, weight_for_length(4.0, frames, 0)),
                               torch.full((2,), 1 + 4.0 / frames), rtol=1e-6, atol=0)
    torch.testing.assert_close(enhance_scale(q, k, frames, weight_for_length(4.0, frames, 21)),
                               torch.full((2,), 1 + 4.0 / 21), rtol=1e-6, atol=0)


def test_per_length_weight_off_or_at_its_reference_is_bit_identical(wan21):
    """0 is today's node; a reference equal to the clip's latent frame count uses the weight as given."""
    def one_step(**kw):
        return sample(apply_enhance_a_video(wan21, weight=40.0, **kw), steps=1)
    today = one_step()
    assert torch.equal(one_step(reference_latent_frames=0), today)
    assert torch.equal(one_step(reference_latent_frames=5), today)
    assert not torch.equal(one_step(reference_latent_frames=9), today)


@pytest.mark.parametrize("reference", [-1, 2.5, True])
def test_bad_reference_latent_frames(wan21, reference):
    with pytest.raises(ValueError, match="reference_latent_frames"):
        apply_enhance_a_video(wan21, 4.0, reference_latent_frames=reference)
