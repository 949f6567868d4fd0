"""Tiny, deterministic image models and VAEs for the EVS sampler's tests and benchmark.

- `sd15_unet()`: an epsilon-prediction SD1.5-layout UNet. ComfyUI's SD15 config demands
  model_channels 320, so it is built from comfy.supported_models.SD15 with a small unet config and
  wrapped in comfy.model_base.BaseModel + ModelPatcher (what ComfyUI's loader does after detection).
  With frames as batch entries it also stands in for an AnimateDiff-patched SD1.5 "video" model:
  AnimateDiff-Evolved is not installed here, so no motion module is inserted.
- `qwen_image()`: a Qwen-Image DiT (flow, latent format Wan21, [B,16,1,H,W] latents). ComfyUI's
  detection infers only in_channels and num_layers (head dims stay 24x128), so it is built the same
  way from comfy.supported_models.QwenImage with small dims.
- Wan 2.1 VAEs come from tiny_models.wan21_vae(seed): seed 0 is the video VAE, seed 1 stands in
  for the Qwen-Image VAE (same architecture, other weights).
- `taesd_vae()`: the image VAE of the SD1.5 model, TAESD layout (ComfyUI's SD VAE config is fixed at
  ch 128, 84M parameters; TAESD is what ComfyUI also accepts as an SD1.5 VAE), real loader.

Weights are cached as safetensors with the real key names in the cache folder of tiny_models.py.
"""

from pathlib import Path

import torch

from support.tiny_models import _cached

SD15_CONTEXT_DIM = 32
QWEN_CONTEXT_DIM = 64


def _sd15_unet_config() -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "context_dim": SD15_CONTEXT_DIM, "use_linear_in_transformer": False,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _qwen_unet_config() -> dict:
    return {
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": QWEN_CONTEXT_DIM,
        "axes_dims_rope": (8, 12, 12),
    }


def _model_config(kind: str):
    import comfy.supported_models
    if kind == "sd15":
        config = comfy.supported_models.SD15(_sd15_unet_config())
        config.unet_config["num_heads"] = 2  # SD15's extra config says 8 heads; 32 channels want fewer
    else:
        config = comfy.supported_models.QwenImage(_qwen_unet_config())
    config.set_inference_dtype(torch.float32, None)
    return config


def _build_base_model(kind: str):
    return _model_config(kind).get_model({})


def _load_patcher(kind: str, path: Path):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    model = _build_base_model(kind)
    sd = comfy.utils.load_torch_file(str(path))
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sd15_unet():
    """Tiny SD1.5-layout epsilon model (latent format SD15, 4 channels, [B,4,H,W])."""
    path = _cached("tiny_sd15_unet.safetensors", lambda: _build_base_model("sd15").diffusion_model)
    return _load_patcher("sd15", path)


def qwen_image():
    """Tiny Qwen-Image DiT (flow, latent format Wan21, [B,16,1,H,W])."""
    path = _cached("tiny_qwen_image.safetensors", lambda: _build_base_model("qwen").diffusion_model)
    return _load_patcher("qwen", path)


def taesd_vae():
    """TAESD-layout SD1.5 image VAE (4 latent channels, 8x spatial)."""
    import comfy.sd
    import comfy.utils

    def build():
        from comfy.taesd.taesd import TAESD
        return TAESD(latent_channels=4)

    def fix(module):
        module.vae_scale.fill_(1.0)
        module.vae_shift.fill_(0.0)
    path = _cached("tiny_taesd_sd15.safetensors", build, fix=fix)
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
