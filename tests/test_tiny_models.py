"""The tiny Wan fixtures load through ComfyUI's own loaders as the intended model classes."""

from support import tiny_models


def test_wan21_loader_detects_wan21_t2v(wan21):
    import comfy.model_base
    import comfy.supported_models
    assert type(wan21.model) is comfy.model_base.WAN21
    assert type(wan21.model.model_config) is comfy.supported_models.WAN21_T2V
    assert len(wan21.model.diffusion_model.blocks) == 4
    assert wan21.model.diffusion_model.num_heads == 2


def test_wan21_vae_loader_detects_the_wan21_vae():
    from comfy.ldm.wan.vae import WanVAE
    vae = tiny_models.load_vae(tiny_models.wan21_vae())
    assert isinstance(vae.first_stage_model, WanVAE)
    assert vae.latent_channels == 16


def test_fixtures_are_deterministic(tmp_path, monkeypatch):
    """A fresh build (empty cache) writes the same bytes as the cached file."""
    from safetensors.torch import load_file
    cached = load_file(str(tiny_models.wan21_t2v()))
    monkeypatch.setattr(tiny_models, "CACHE", tmp_path)
    fresh = load_file(str(tiny_models.wan21_t2v()))
    assert cached.keys() == fresh.keys()
    assert all((cached[k] == fresh[k]).all() for k in cached)
