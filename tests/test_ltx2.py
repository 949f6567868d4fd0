"""LTX-2 (ComfyUI's audio-video LTXAVModel, newer ComfyUI only): what is special to it, by value.

Every method acts on the video stream's self-attention (`attn1`) and never on the audio stream's
(`audio_attn1`) or the cross-modal attention between the streams. The audio changes only where the
audio stream reads the changed video (its video-to-audio cross-attention): with ComfyUI's own
option that turns that attention off (transformer_options "v2a_cross_attn": False), a patched
model's audio output equals the plain model's bit for bit while its video differs. The family
matrix (tests/test_families.py and the other tests over support/families.py) covers the rest.
"""

import copy

import pytest
import torch

from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.entropy_editing import apply_entropy_editing
from freevideo.enhance_core.methods.entropy_guidance import apply_entropy_guidance
from freevideo.enhance_core.methods.feature_accumulation import apply_feature_accumulation
from freevideo.enhance_core.models import adapter_for
from freevideo.enhance_core.patching.layer_routing import SelfAttentionLayers
from support import tiny_models
from support.families import BY_ID, FRAMES, conditioning, load, latent
from support.sampling import force_unbatched, ksample

pytestmark = pytest.mark.families

FAM = BY_ID["ltx2"]
VIDEO_TOKENS = FRAMES * FAM.size ** 2  # patch 1: one token per latent pixel
AUDIO_TOKENS = 17  # audio latents of the family's latent: 17 pixel frames at 25 fps, 25 latents per second

METHODS = {
    "enhance_a_video": lambda m: apply_enhance_a_video(m, weight=40.0),
    "guidance": lambda m: apply_entropy_guidance(m, 3.0, layers="1"),
    "editing": lambda m: apply_entropy_editing(m, conditioning(FAM, 4), ratio=1.0),
    "feature_accumulation_attention_input": lambda m: apply_feature_accumulation(m, "0.5", 3, "attention input"),
    "feature_accumulation_block_input": lambda m: apply_feature_accumulation(m, "0.5", 3, "block input"),
}


@pytest.fixture(scope="module")
def model():
    return load(FAM)


@pytest.fixture(scope="module")
def grown():
    """The tiny LTX-2 with its 2 blocks copied to 6: feature accumulation needs groups of several
    layers to average (with 2, layer 1's cache is its own input)."""
    model = tiny_models.load_diffusion_model(tiny_models.ltx2())
    blocks = model.get_model_object("diffusion_model").transformer_blocks
    blocks.extend([copy.deepcopy(b) for _ in range(2) for b in blocks])
    return model


def streams(model, steps=2):
    """(video, audio) sampled by `model` from the family's latent."""
    out = ksample(model, latent(FAM), conditioning(FAM, 1), conditioning(FAM, 2), steps=steps, cfg=3.0)
    video, audio = out.unbind()
    return video, audio


def without_video_to_audio(model):
    """A clone whose audio stream never reads the video (ComfyUI's own block option)."""
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["v2a_cross_attn"] = False
    return clone


def test_latent_is_comfyuis_video_and_audio_pair(model):
    video, audio = latent(FAM)["samples"].unbind()
    assert video.shape == (1, FAM.channels, FRAMES, FAM.size, FAM.size)
    assert audio.shape == (1, 8, AUDIO_TOKENS, 16)  # LTXVEmptyLatentAudio's channels and frequency bins
    assert adapter_for(model).name == "LTX-2"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_audio_changes_only_through_the_video_to_audio_attention(model, grown, method, monkeypatch):
    """With video-to-audio cross-attention off, the audio output is the plain model's, bit for bit,
    and the video differs; with it on (the model's default), the audio follows the changed video.
    Every cond and branch runs in a forward of its own, as when memory is short, so that no batch
    size differs from the plain run's (float rounding of a batched matrix product may depend on it)."""
    force_unbatched(monkeypatch)
    model = grown if method.startswith("feature_accumulation") else model
    isolated = without_video_to_audio(model)
    plain_video, plain_audio = streams(isolated)
    video, audio = streams(METHODS[method](isolated))
    assert torch.isfinite(video).all() and not torch.equal(video, plain_video)
    assert torch.equal(audio, plain_audio)
    assert not torch.equal(streams(METHODS[method](model))[1], streams(model)[1])


def test_only_the_video_self_attention_is_routed(model):
    """Every kernel call handed to a method is attn1's over the video tokens, once per layer and
    model call; audio_attn1 and the cross-modal attention make their calls beside it, unrouted."""
    clone = model.clone()
    dm = clone.get_model_object("diffusion_model")
    n = len(adapter_for(clone).sites(dm))
    routed, audio_calls, inside_audio = [], [], []

    def handler(call):
        routed.append((call.layer, call.q.shape, bool(inside_audio)))
        return call.run()
    SelfAttentionLayers(clone, adapter_for(clone), "test_ltx2_routing", "test").route(range(n), handler)
    def audio_done(module, args, out):
        inside_audio.pop()
        audio_calls.append(out.shape)
    handles = []
    for block in dm.transformer_blocks:
        handles += [block.audio_attn1.register_forward_pre_hook(lambda m, a: inside_audio.append(True)),
                    block.audio_attn1.register_forward_hook(audio_done)]
    try:
        ksample(clone, latent(FAM), conditioning(FAM, 1), conditioning(FAM, 2), steps=1, cfg=3.0)
    finally:
        for h in handles:
            h.remove()
    assert len(audio_calls) == n  # the audio self-attention ran (cond and uncond in one batch)
    assert [layer for layer, _, _ in routed] == list(range(n))
    for _, q_shape, in_audio in routed:
        assert not in_audio
        assert VIDEO_TOKENS in q_shape and AUDIO_TOKENS not in q_shape


def test_guidance_branches_run_every_block(model):
    """The block-replace points hand LTX-2's blocks per-frame timestep embeddings that are not
    batch-first tensors: no shared prefix, the branches run every block, and the guidance acts."""
    dm = model.get_model_object("diffusion_model")
    assert adapter_for(model).prefix_points(dm) is None
    guided = apply_entropy_guidance(model, 3.0, layers="1")
    assert not guided.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit")
    assert not torch.equal(streams(guided)[0], streams(model)[0])
