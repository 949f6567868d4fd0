"""The demo models' training script (scripts/train_demo_models.py) runs, writes files ComfyUI's own
loaders read back as the configs the script trains, and its VAE recalibration leaves decoding
unchanged. A few steps only: the real training (~30 min) never runs in the tests."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_demo_models  # noqa: E402


def _wan_rope_is_differentiable() -> bool:
    """Newer ComfyUI may compute Wan's RoPE with a comfy_kitchen kernel that has no backward."""
    from comfy.ldm.flux.math import apply_rope1
    x = torch.randn(1, 2, 1, 4, requires_grad=True)
    freqs = torch.randn(1, 2, 1, 2, 2, 2)
    try:
        apply_rope1(x, freqs).sum().backward()
    except RuntimeError as e:
        if "autograd" not in str(e):
            raise
        return False
    return True


def test_smoke_training_writes_models_comfyui_loads(tmp_path):
    import comfy.sd
    import comfy.utils
    if not _wan_rope_is_differentiable():
        pytest.skip("this ComfyUI computes Wan's RoPE with a kernel that has no backward (comfy_kitchen): the "
                    "demo models train on the embedded ComfyUI 0.3.75 runtime (bash scripts/test.sh sets it up)")
    # The session's thread count (tests/conftest.py), not the script's default of 2: two threads on
    # a busy 2-core machine made each smoke run 5x slower.
    threads = ["--threads", str(torch.get_num_threads())]
    report = train_demo_models.main(["--smoke", *threads, "--out", str(tmp_path)])
    assert report["vae_history"] and report["dit_history"]
    assert json.loads((tmp_path / "training_log.json").read_text())["args"]["threads"] == torch.get_num_threads()
    model = comfy.sd.load_diffusion_model(str(tmp_path / train_demo_models.DIT_FILE))
    config = model.model.model_config.unet_config
    for key in ("dim", "ffn_dim", "num_layers", "num_heads", "in_dim", "out_dim"):
        assert config[key] == train_demo_models.DIT_CONFIG[key], key
    assert type(model.model).__name__ == "WAN21"
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tmp_path / train_demo_models.VAE_FILE)))
    assert vae.latent_channels == 16 and vae.first_stage_model.dim == train_demo_models.VAE_CONFIG["dim"]
    frames = vae.decode(torch.zeros(1, 16, 2, 8, 8))
    assert frames.shape[-4:] == (5, 64, 64, 3)
    # --dit-only keeps the VAE file and retrains the DiT on its latents, recording where the VAE came from.
    vae_bytes = (tmp_path / train_demo_models.VAE_FILE).read_bytes()
    again = train_demo_models.main(["--smoke", *threads, "--dit-only", "--out", str(tmp_path)])
    assert (tmp_path / train_demo_models.VAE_FILE).read_bytes() == vae_bytes
    assert again["vae_from"]["out"] == tmp_path.name and again["vae_history"] == report["vae_history"]
    assert again["args"]["dit_only"] and again["dit_history"]
    # a second --dit-only run still names the command that trained the VAE
    third = train_demo_models.main(["--smoke", *threads, "--dit-only", "--out", str(tmp_path)])
    assert third["vae_from"] == again["vae_from"] and not third["vae_from"]["dit_only"]


def test_recalibration_normalises_latents_and_keeps_decoding():
    torch.manual_seed(0)
    vae = train_demo_models.build_vae().eval()
    with torch.no_grad():
        x = torch.rand(3, 3, 1, 64, 64) * 2 - 1
        raw = vae.encode(x)
        before = vae.decode(raw)
        new = train_demo_models.recalibrate_vae(vae, raw)
        assert torch.allclose(vae.encode(x), new, atol=1e-4)
        after = vae.decode(new)
    assert torch.allclose(before, after, atol=1e-4)
    mean, std = train_demo_models.wan21_latent_stats()
    normalised = (new - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    assert normalised.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4
    assert (normalised.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-3


def test_flow_objective_matches_comfyui_wan_sampling():
    """x_t and the velocity target as ComfyUI's Wan model sampling (CONST) defines them: the model's
    exact prediction noise - x0 gives back x0 as ComfyUI's denoised output."""
    import comfy.model_sampling
    x0, noise, sigma = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4), torch.tensor([0.3, 0.8])
    const = comfy.model_sampling.CONST()
    x_t = const.noise_scaling(sigma, noise, x0)
    s = sigma.view(-1, 1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise)
    assert torch.allclose(const.calculate_denoised(sigma, noise - x0, x_t), x0, atol=1e-6)
    flow = comfy.model_sampling.ModelSamplingDiscreteFlow()
    assert torch.allclose(flow.timestep(sigma), sigma * 1000)


def test_training_noise_levels_are_shifted_as_the_demo_samples():
    """The DiT trains at the noise levels the demo samples at: ComfyUI's shift-3 schedule puts most
    levels high, so must the training (median of the unshifted mix 0.5, shifted 0.75)."""
    import demo
    assert train_demo_models.SIGMA_SHIFT == demo.SHIFT
    sigmas = train_demo_models.sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert 0.72 < sigmas.median() < 0.78 and 0 < sigmas.min() and sigmas.max() < 1


def test_shape_cells_follow_the_causal_latent_grid():
    """Latent frame 0 is frame 0 alone, latent frame k frames 4k-3 .. 4k; a cell counts when the shape
    touches any of its 8x8 pixels in those frames."""
    mask = torch.zeros(9, 16, 16, dtype=torch.bool)
    mask[0, :8, :8] = True    # frame 0: the whole top-left cell
    mask[2, 8, 15] = True     # frame 2 (latent frame 1): one pixel of the bottom-right cell
    mask[8, 0:8, 8:10] = True  # frame 8 (latent frame 2): a quarter of the top-right cell
    cells = train_demo_models.shape_cells(mask)
    assert cells.shape == (1, 3, 2, 2)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 0, 1] = 1.0
    assert torch.equal(cells[0], expected)


def test_shape_cells_weigh_in_the_flow_loss():
    """The cells the shape touches weigh 1 + SHAPE_WEIGHT: an error there costs that much more."""
    class Zero(torch.nn.Module):
        def forward(self, x, t, context):
            return torch.zeros_like(x)
    x0, noise = torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 16, 1, 2, 2)
    noise[..., 0, 0] = 1.0  # the target noise - x0 is 1 in cell (0, 0) only; the model predicts 0
    sigma = torch.tensor([0.5])
    cells = torch.zeros(1, 1, 1, 2, 2)
    assert train_demo_models.flow_loss(Zero(), x0, None, sigma, noise, cells) == pytest.approx(1 / 4)
    cells[..., 0, 0] = 1.0
    w = 1 + train_demo_models.SHAPE_WEIGHT
    assert train_demo_models.flow_loss(Zero(), x0, None, sigma, noise, cells) == pytest.approx(w / (w + 3))
