"""The native ComfyUI video families as tiny models: how each is built and loaded, its
conditioning, and a KSampler run through ComfyUI's real loaders, model patcher and sampler.
Shared by the family-matrix tests of every method."""

import importlib
import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

from support import tiny_models
from support.sampling import ksample

TEXT_TOKENS = 8
FRAMES = 3


@dataclass(frozen=True)
class Family:
    id: str
    model_base: str  # class name in comfy.model_base
    config: str  # class name in comfy.supported_models
    adapter: str  # adapter name
    file: str  # tiny_models function that writes the weights
    channels: int
    size: int  # latent height and width
    text_dim: int
    extras: dict = field(default_factory=dict)  # extra conditioning: name -> shape (tensors) or value
    loader: str | None = None  # tiny_models function that builds the patcher (None: ComfyUI's loader)
    requires: str | None = None  # module the running ComfyUI must have
    layers: int = 2  # self-attention layers of the tiny model
    # Function of this module that builds the latent of an audio-video family from the video latent
    # (None: the video latent alone).
    av_latent: str | None = None


FAMILIES = [
    Family("wan22_ti2v_5b", "WAN22", "WAN22_T2V", "Wan 2.1 / 2.2", "wan22_ti2v_5b", 48, 8, 4096),
    Family("hunyuan_video", "HunyuanVideo", "HunyuanVideo", "HunyuanVideo 1.0 / 1.5", "hunyuan_video_t2v", 16, 8, 4096,
           {"pooled_output": (1, 768), "guidance": 6.0}, layers=4),
    Family("hunyuan_video_15", "HunyuanVideo15", "HunyuanVideo15", "HunyuanVideo 1.0 / 1.5", "hunyuan_video_15", 32, 4,
           3584, {"pooled_output": (1, 768)}),
    Family("ltxv", "LTXV", "LTXV", "LTX-Video", "ltxv", 128, 4, 4096, {"attention_mask": "ones"}),
    Family("mochi", "GenmoMochi", "GenmoMochi", "Mochi", "mochi", 12, 8, 256,
           {"attention_mask": "ones"}, loader="load_mochi"),
    Family("cosmos_predict2", "CosmosPredict2", "CosmosT2IPredict2", "Cosmos-Predict2", "cosmos_predict2", 16, 8, 1024,
           layers=10),
    Family("cosmos1", "CosmosVideo", "CosmosT2V", "Cosmos 1.0", "cosmos1", 16, 8, 1024, loader="load_cosmos1"),
    Family("cogvideox", "CogVideoX", "CogVideoX_T2V", "CogVideoX (newer ComfyUI)", "cogvideox", 16, 8, 4096,
           requires="comfy.ldm.cogvideo.model"),
    Family("kandinsky5", "Kandinsky5", "Kandinsky5", "Kandinsky 5 (newer ComfyUI)", "kandinsky5", 16, 8, 3584,
           {"pooled_output": (1, 768)}, requires="comfy.ldm.kandinsky5.model"),
    # Text features of 2 x 64: the video and audio halves the model's text connectors produce.
    Family("ltx2", "LTXAV", "LTXAV", "LTX-2", "ltx2", 128, 4, 128, {"attention_mask": "ones", "frame_rate": 25.0},
           requires="comfy.ldm.lightricks.av_model", av_latent="ltx2_av_latent"),
    # Text-only token tags, as MiniMax H3's text encoder gives them for a prompt without images.
    Family("minimax_h3", "MiniMaxH3", "MiniMaxH3", "MiniMax H3 (newer ComfyUI)", "minimax_h3", 24, 8, 512,
           {"minimax_token_tags": "ones"}, requires="comfy.ldm.minimax.model", av_latent="minimax_h3_av_latent"),
]
BY_ID = {f.id: f for f in FAMILIES}
# The workflows of families only newer ComfyUI has (0.33 has both): the family's name as their notes
# give it, and its id above (its `requires` is the module a ComfyUI with the family has).
NEWER_FAMILY_WORKFLOWS = {"ltx2_t2v_enhance_a_video": ("LTX-2", "ltx2"),
                          "minimax_h3_t2v_enhance_a_video": ("MiniMax H3", "minimax_h3")}


def comfy_has(module: str) -> bool:
    """Whether the running ComfyUI (the one the tests import and their servers start) has `module`."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
_models = {}
_plain = {}


def release():
    """Drop the cached models and samples. The test session calls it at its end: the patchers must
    go while ComfyUI is still whole (their __del__ needs it)."""
    _models.clear()
    _plain.clear()


def load(fam):
    """The tiny model of `fam`, loaded once per test session (skips where this ComfyUI lacks the family)."""
    if fam.requires is not None:
        try:
            importlib.import_module(fam.requires)
        except ImportError:
            pytest.skip(f"this ComfyUI has no {fam.requires}")
    if fam.id not in _models:
        path = getattr(tiny_models, fam.file)()
        _models[fam.id] = (getattr(tiny_models, fam.loader)() if fam.loader
                           else tiny_models.load_diffusion_model(path))
    return _models[fam.id]


def conditioning(fam, seed, tokens=TEXT_TOKENS):
    """`fam`'s text conditioning: a prompt of `tokens` tokens and the family's extra inputs."""
    g = torch.Generator().manual_seed(seed)
    extras = {}
    for name, spec in fam.extras.items():
        if spec == "ones":  # a text attention mask, integer as the text encoders give it
            extras[name] = torch.ones(1, tokens, dtype=torch.long)
        elif isinstance(spec, tuple):
            extras[name] = torch.randn(*spec, generator=g)
        else:
            extras[name] = spec
    return [[torch.randn(1, tokens, fam.text_dim, generator=g), extras]]


def latent(fam, frames=FRAMES, size=None):
    """An empty latent of `fam` ({"samples": ...}): `frames` latent frames of size x size (default:
    the family's size), with the family's audio where it has one."""
    size = fam.size if size is None else size
    video = torch.zeros(1, fam.channels, frames, size, size)
    return {"samples": video} if fam.av_latent is None else globals()[fam.av_latent](video)


def sample(fam, model, steps=2, cfg=3.0):
    """A KSampler run of `fam`'s latent (FRAMES latent frames) with conditioning seeds 1 and 2."""
    return flat(ksample(model, latent(fam), conditioning(fam, 1), conditioning(fam, 2), steps=steps, cfg=cfg))


def flat(samples):
    """A sampled latent as one tensor: an audio-video latent (ComfyUI's NestedTensor) as its streams
    flattened per batch element and joined, as ComfyUI's sampler packs them; any other as it is."""
    if not getattr(samples, "is_nested", False):
        return samples
    return torch.cat([t.reshape(t.shape[0], -1) for t in samples.unbind()], dim=1)


def plain(fam):
    """sample() of the unpatched model, computed once per test session."""
    if fam.id not in _plain:
        _plain[fam.id] = sample(fam, load(fam))
    return _plain[fam.id]


def ltx2_av_latent(video):
    """LTX-2's latent as its empty-latent nodes and LTXVConcatAVLatent make it: the video and an
    audio latent of 8 channels x 16 frequency bins at 25 latents per second, for the video's
    (F - 1) * 8 + 1 pixel frames at 25 frames per second."""
    import comfy.nested_tensor
    pixel_frames, frame_rate = (video.shape[2] - 1) * 8 + 1, 25.0
    audio = torch.zeros(video.shape[0], 8, round(pixel_frames / frame_rate * 25), 16)
    return {"samples": comfy.nested_tensor.NestedTensor((video, audio))}


def minimax_h3_av_latent(video):
    """MiniMax H3's latent as EmptyMiniMaxH3LatentAV makes it: the video and a stereo audio latent
    of 32 channels at 40 latents per second for the video's pixel frames at 24 frames per second
    (latent frame k holds 1 pixel frame when k % 5 == 0, else 4)."""
    import comfy.nested_tensor
    from comfy.ldm.minimax.model import FRAME_PER_TOKEN
    pixel_frames = sum(FRAME_PER_TOKEN[k % 5] for k in range(video.shape[2]))
    audio = torch.zeros(video.shape[0], 32, 2, round(pixel_frames / 24 * 40))
    return {"samples": comfy.nested_tensor.NestedTensor((video, audio))}
