"""Tiny, deterministic models built with ComfyUI's own classes, for tests, benchmarks and the demo.

Families whose size ComfyUI's loader infers from the weights are saved as safetensors with the real
key names and loaded through ComfyUI's own loader. Each file is generated on first use into the
cache folder (FREEVIDEO_MODEL_CACHE, default .runtime/tiny_models) and reused after.
"""

import hashlib
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FREEVIDEO_MODEL_CACHE", ROOT / ".runtime" / "tiny_models"))


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic weights that keep activations of a random transformer in a sane range:
    matrices ~ N(0, 1/fan_in), norm scales ~ 1, biases and modulation vectors small. Each tensor is
    seeded from its own name, so adding a parameter does not change the others."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(seed ^ int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf == "weight":
                fan_in = p[0].numel()
                value = noise / fan_in ** 0.5
            elif leaf in ("weight", "scale") and ("norm" in name or p.ndim == 1):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


def _save(module: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def _cached(name: str, build) -> Path:
    path = CACHE / name
    if not path.exists():
        module = build()
        init_weights(module)
        _save(module, path)
    return path


def wan21_t2v() -> Path:
    """Wan 2.1 T2V layout, 4 blocks of dim 256 (ComfyUI infers 2 heads of 128)."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256,
                        text_dim=4096, out_dim=16, num_heads=2, num_layers=4, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_wan21_t2v.safetensors", build)


def load_diffusion_model(path: Path):
    """Load through ComfyUI's own loader (what the UNETLoader node calls)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def wan21_vae() -> Path:
    """Wan 2.1 VAE layout with base width 8 (ComfyUI infers it from decoder.head.0.gamma)."""
    def build():
        from comfy.ldm.wan.vae import WanVAE
        return WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
    return _cached("tiny_wan21_vae.safetensors", build)


def load_vae(path: Path):
    """Load through ComfyUI's own VAE loader (what the VAELoader node calls)."""
    import comfy.sd
    import comfy.utils
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
