"""EVS sampler through ComfyUI's real samplers, guiders, model sampling and VAEs, on tiny models.

Models: a tiny SD1.5-layout epsilon UNet (image model, and with frames as batch entries also the
"video" model of the direct path: AnimateDiff-Evolved is not installed here, so no motion module is
inserted), a tiny Qwen-Image DiT (flow), the tiny Wan 2.1 T2V (flow, temporally compressed latents)
and tiny Wan 2.1 / TAESD VAEs. Model calls are recorded with an APPLY_MODEL wrapper on clones.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
from freevideo.enhance_core.patching.attention_slot import add_attention_override
from freevideo.enhance_core.methods.evs.sampler import Stage, evs_sample
from support import tiny_image_models as T
from support import tiny_models
from support.sampling import text_conditioning

ROOT = Path(__file__).resolve().parent.parent
WAN_DIM = 4096


@dataclass
class Call:
    tag: str
    sigma: float
    batch: int
    x: torch.Tensor
    out: torch.Tensor


def recording(model, tag, calls, after=None):
    """A clone of `model` that appends every model call to `calls`."""
    m = model.clone()

    def wrapper(executor, x, t, *args, **kwargs):
        if after is not None:
            after("start")
        out = executor(x, t, *args, **kwargs)
        calls.append(Call(tag, float(t.max()), x.shape[0], x.detach().clone(), out.detach().clone()))
        if after is not None:
            after(calls[-1])
        return out
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_evs_record", wrapper)
    return m


def stage(model, cond_dim, cfg, steps, sampler="euler", scheduler="normal"):
    return Stage(model, text_conditioning(dim=cond_dim, seed=1), text_conditioning(dim=cond_dim, seed=2), cfg, sampler,
                 scheduler, steps)


def sigmas(model, scheduler, steps):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float()


@pytest.fixture(scope="module")
def sd15():
    return T.sd15_unet()


@pytest.fixture(scope="module")
def qwen():
    return T.qwen_image()


@pytest.fixture(scope="module")
def vaes():
    return {"wan": tiny_models.load_vae(tiny_models.wan21_vae(0)), "qwen": tiny_models.load_vae(tiny_models.wan21_vae(1)),
            "taesd": T.taesd_vae()}


def sd15_video(frames=3):
    return {"samples": torch.randn(frames, 4, 4, 4, generator=torch.Generator().manual_seed(7))}


def wan_video(batch=1, frames=2):
    return {"samples": torch.randn(batch, 16, frames, 2, 2, generator=torch.Generator().manual_seed(7))}


def image_run(strength, image_steps):
    return math.floor(strength * image_steps + 0.5)  # strength x steps, rounded half up


def expected_calls(image_sigmas, video_sigmas, image_steps, strength, t_T2V, video_steps, t_V, n_V):
    """Algorithm 1 in model calls (first-order sampler): (model, sigma) in order."""
    t1 = image_run(strength, image_steps)
    seq = [("image", float(image_sigmas[image_steps - t])) for t in range(t1, t_T2V - 1, -1)]  # ends with x0_I
    seq += [("video", float(video_sigmas[video_steps - t])) for t in range(t_V, t_V - n_V, -1)]
    if t_V - n_V > 0:
        seq.append(("video", float(video_sigmas[video_steps - (t_V - n_V)])))  # x0 prediction at t_V - n_V
    seq += [("image", float(image_sigmas[image_steps - t])) for t in range(t_T2V, 0, -1)]
    return seq


@pytest.mark.parametrize("image_steps,strength,t_T2V,video_steps,t_V,n_V,image_cfg,video_cfg", [
    (4, 0.5, 2, 2, 2, 2, 2.0, 1.0),   # block right at the start of the image run, block ends clean
    (4, 0.5, 1, 3, 2, 1, 1.0, 3.0),   # block ends above level 0: one more call for its x0
    (5, 0.5, 2, 4, 3, 2, 2.0, 2.0),   # 2.5 image steps round up to 3
])
def test_schedule_is_algorithm_1(sd15, image_steps, strength, t_T2V, video_steps, t_V, n_V, image_cfg, video_cfg):
    calls = []
    image = stage(recording(sd15, "image", calls), T.SD15_CONTEXT_DIM, image_cfg, image_steps, scheduler="normal")
    video = stage(recording(sd15, "video", calls), T.SD15_CONTEXT_DIM, video_cfg, video_steps, scheduler="sgm_uniform")
    latent = sd15_video(frames=3)
    evs_sample(image, video, latent, strength, t_T2V, t_V, n_V, seed=3)
    want = expected_calls(sigmas(sd15, "normal", image_steps), sigmas(sd15, "sgm_uniform", video_steps),
                          image_steps, strength, t_T2V, video_steps, t_V, n_V)
    assert [(c.tag, pytest.approx(c.sigma, rel=1e-5)) for c in calls] == want
    frames = latent["samples"].shape[0]
    for c in calls:  # cond and uncond run as one batch; cfg 1 skips uncond
        cfg = image_cfg if c.tag == "image" else video_cfg
        assert c.batch == frames * (1 if cfg == 1.0 else 2)


def _wan_bridge(image_vae, video_vae, image_dims):
    """The pixel bridge written out with the VAEs (independent of latent_bridge.py)."""
    def to_image(z):
        px = video_vae.decode(z).reshape(-1, 16, 16, 3)
        if image_vae.latent_dim == 3:
            return torch.cat([image_vae.encode(px[i:i + 1]) for i in range(px.shape[0])])
        out = image_vae.encode(px)
        return out.unsqueeze(2) if image_dims == 3 else out

    def to_video(z):
        px = image_vae.decode(z).reshape(-1, 16, 16, 3)
        return video_vae.encode(px)
    return to_image, to_video


@pytest.mark.parametrize("pair", ["sd15-eps+sd15-eps direct", "qwen-flow+wan-flow pixels"])
def test_handover_latents_are_x0_predictions_renoised_with_each_models_scaling(pair, sd15, qwen, wan21, vaes):
    calls = []
    image_steps, strength, t_T2V, video_steps, t_V, n_V, seed = 6, 0.5, 2, 4, 3, 2, 11
    kwargs = {}
    if pair.startswith("sd15-eps+sd15"):
        image_model, video_model, latent = sd15, sd15, sd15_video()
        image_dim, video_dim = T.SD15_CONTEXT_DIM, T.SD15_CONTEXT_DIM
        to_image = to_video = lambda z: z
    else:
        image_model = sd15 if pair.startswith("sd15") else qwen
        image_vae = vaes["taesd"] if pair.startswith("sd15") else vaes["qwen"]
        video_model, latent = wan21, wan_video()
        image_dim = T.SD15_CONTEXT_DIM if pair.startswith("sd15") else T.QWEN_CONTEXT_DIM
        video_dim = WAN_DIM
        kwargs = dict(image_vae=image_vae, video_vae=vaes["wan"])
        to_image, to_video = _wan_bridge(image_vae, vaes["wan"], 2 if pair.startswith("sd15") else 3)
    # cfg 1: each call's output is the denoised latent the sampler uses
    image = stage(recording(image_model, "image", calls), image_dim, 1.0, image_steps)
    video = stage(recording(video_model, "video", calls), video_dim, 1.0, video_steps, scheduler="simple")
    out, _ = evs_sample(image, video, latent, strength, t_T2V, t_V, n_V, seed=seed, **kwargs)

    ms_i = image_model.get_model_object("model_sampling")
    ms_v = video_model.get_model_object("model_sampling")
    lf_i = image_model.get_model_object("latent_format")
    lf_v = video_model.get_model_object("latent_format")
    s_i, s_v = sigmas(image_model, "normal", image_steps), sigmas(video_model, "simple", video_steps)
    z_image = to_image(latent["samples"])
    g = torch.Generator().manual_seed(seed)
    n1 = torch.randn(z_image.shape, generator=g)
    n2 = torch.randn(latent["samples"].shape, generator=g)
    n3 = torch.randn(z_image.shape, generator=g)

    image_calls = [c for c in calls if c.tag == "image"]
    video_calls = [c for c in calls if c.tag == "video"]
    before = image_run(strength, image_steps) - t_T2V  # image steps before the block
    tol = dict(rtol=1e-4, atol=1e-4)
    # T2I start: the video frames noised to level t1 with the image model's scaling
    s_t1 = s_i[image_steps - image_run(strength, image_steps)]
    torch.testing.assert_close(image_calls[0].x, ms_i.noise_scaling(s_t1, n1, lf_i.process_in(z_image)), **tol)
    # [T2V] entry: x0_I (the image model's prediction at level t_T2V) noised to t_V by the video model
    x0_i = image_calls[before]
    assert x0_i.sigma == pytest.approx(float(s_i[image_steps - t_T2V]), rel=1e-5)
    entry = ms_v.noise_scaling(s_v[video_steps - t_V], n2, lf_v.process_in(to_video(lf_i.process_out(x0_i.out))))
    torch.testing.assert_close(video_calls[0].x, entry, **tol)
    # back: x0_IV (the video model's prediction at level t_V - n_V) re-noised to t_T2V by the image model
    x0_iv = video_calls[-1]
    assert x0_iv.sigma == pytest.approx(float(s_v[video_steps - (t_V - n_V)]), rel=1e-5)
    back = ms_i.noise_scaling(s_i[image_steps - t_T2V], n3, lf_i.process_in(to_image(lf_v.process_out(x0_iv.out))))
    torch.testing.assert_close(image_calls[before + 1].x, back, **tol)
    # the output is the image run's final clean latent, in the video's format
    torch.testing.assert_close(out["samples"], to_video(lf_i.process_out(image_calls[-1].out)), **tol)
    assert out["samples"].shape == latent["samples"].shape


def test_pixel_bridge_round_trips_a_temporally_compressed_video(qwen, sd15, wan21, vaes):
    from freevideo.enhance_core.methods.evs.latent_bridge import make_bridge
    latent = wan_video(batch=2, frames=2)["samples"]  # 2 videos x 2 latent frames = 2 x 5 pixel frames
    for image_model, image_vae, shape in [(qwen, vaes["qwen"], (10, 16, 1, 2, 2)), (sd15, vaes["taesd"], (10, 4, 2, 2))]:
        bridge = make_bridge(image_model, wan21, latent, image_vae, vaes["wan"])
        assert bridge.kind == "pixels"
        frames = bridge.to_image(latent)
        assert tuple(frames.shape) == shape
        # frames of video b are batch entries 5b .. 5b+4
        torch.testing.assert_close(frames[5:], bridge.to_image(latent[1:]), rtol=1e-4, atol=1e-4)
        video, pixels = bridge.finish(frames)
        assert video.shape == latent.shape and tuple(pixels.shape) == (10, 16, 16, 3)
        # Values: the same as the bridge written out with the VAEs themselves.
        to_image, to_video = _wan_bridge(image_vae, vaes["wan"], 3 if len(shape) == 5 else 2)
        torch.testing.assert_close(frames, to_image(latent), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(video, torch.cat([to_video(frames[5 * b:5 * b + 5]) for b in range(2)]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pixels, image_vae.decode(frames).reshape(-1, 16, 16, 3), rtol=1e-4, atol=1e-4)


def test_direct_bridge_passes_latents_unchanged(sd15):
    from freevideo.enhance_core.methods.evs.latent_bridge import make_bridge
    latent = sd15_video()["samples"]
    bridge = make_bridge(sd15, sd15, latent)
    assert bridge.kind == "direct" and bridge.to_image(latent) is latent and bridge.to_video(latent) is latent


def test_same_seed_same_output_different_seed_different_output(sd15):
    image = stage(sd15, T.SD15_CONTEXT_DIM, 2.0, 4)
    video = stage(sd15, T.SD15_CONTEXT_DIM, 1.0, 2, scheduler="sgm_uniform")
    run = lambda seed: evs_sample(image, video, sd15_video(), 0.5, 1, 2, 1, seed=seed)[0]["samples"]
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sfi_inverts_with_the_video_model_and_injects_recorded_features(qwen, wan21, vaes):
    """DDIM inversion of x0_I (conditional only), then Attn(g*Q_inv + (1-g)*Q, K_inv, V_inv) in the
    chosen layer. A recorder installed under the SFI override sees the kernel inputs after injection.
    Also: the pixel path with SFI is deterministic and leaves the input models untouched."""
    from support.sampling import ksample
    cond = text_conditioning(dim=WAN_DIM, seed=1), text_conditioning(dim=WAN_DIM, seed=2)
    plain = lambda: ksample(wan21, wan_video(), *cond, steps=2, cfg=2.0)
    plain_before = plain()
    layer, video_steps, t_V, n_V = 1, 4, 2, 1
    runs, outputs = {}, []
    for gamma in (0.5, 0.0, 0.5):
        calls, kernel = [], []
        wan = wan21.clone()
        add_attention_override(wan, "test_recorder", lambda call_next, q, k, v, heads, **kw: (kernel.append((q, k, v)), call_next(q, k, v, heads, **kw))[1])
        marks = lambda c: kernel.append(c)  # "start" before a model call, the Call after it
        image = stage(recording(qwen, "image", calls), T.QWEN_CONTEXT_DIM, 1.0, 2, scheduler="simple")
        video = stage(recording(wan, "video", calls, after=marks), WAN_DIM, 2.0, video_steps, scheduler="simple")
        outputs.append(evs_sample(image, video, wan_video(), 0.5, 1, t_V, n_V, seed=4, image_vae=vaes["qwen"],
                                  video_vae=vaes["wan"], sfi=True, sfi_layers=str(layer), sfi_gamma=gamma))
        # group the kernel calls of each video model call; Wan runs self- then cross-attention per block
        per_call, current = [], None
        for item in kernel:
            if isinstance(item, str):
                current = []
            elif isinstance(item, Call):
                per_call.append((item, current))
            else:
                current.append(item)
        runs.setdefault(gamma, per_call)

    (out_a, frames_a), _, (out_c, frames_c) = outputs
    assert torch.equal(out_a["samples"], out_c["samples"]) and torch.equal(frames_a, frames_c)  # same seed, same output
    assert out_a["samples"].shape == wan_video()["samples"].shape and tuple(frames_a.shape) == (5, 16, 16, 3)
    assert torch.equal(plain_before, plain())  # the video model passed in is untouched
    s_v = sigmas(wan21, "simple", video_steps)
    per_call = runs[0.5]
    inversion, block = per_call[:t_V], per_call[t_V:]
    # inversion: levels 1..t_V going up, conditional batch only (video cfg 2 is not applied)
    assert [pytest.approx(c.sigma, rel=1e-5) for c, _ in inversion] == [float(s_v[video_steps - t]) for t in range(1, t_V + 1)]
    assert all(c.batch == 1 for c, _ in inversion)
    # The block starts from the inverted latent (the inversion's last step; Wan is a flow model, whose
    # input ComfyUI does not rescale): no fresh noise. The inversion itself is tested by round trips below.
    levels = [0.0] + [c.sigma for c, _ in inversion]
    last = inversion[-1][0]
    inverted = last.x + (last.x - last.out) * ((levels[-1] - levels[-2]) / levels[-1])
    first_block, kernels = block[0]
    torch.testing.assert_close(first_block.x[:1], inverted, rtol=1e-4, atol=1e-5)  # no fresh noise
    assert first_block.batch == 2 and first_block.sigma == pytest.approx(levels[-1], rel=1e-5)
    # injection at level t_V: K, V are the inversion's (tiled over cond/uncond), Q is blended
    q_inv, k_inv, v_inv = inversion[-1][1][2 * layer]
    q_seen, k_seen, v_seen = kernels[2 * layer]
    torch.testing.assert_close(k_seen, k_inv.repeat(2, 1, 1))
    torch.testing.assert_close(v_seen, v_inv.repeat(2, 1, 1))
    q_own = runs[0.0][t_V][1][2 * layer][0]  # gamma 0: the block's own query (layers before 1 are not injected)
    torch.testing.assert_close(q_seen, 0.5 * q_inv.repeat(2, 1, 1) + 0.5 * q_own)
    # an unchosen layer keeps its own keys
    assert not torch.allclose(kernels[0][1], inversion[-1][1][0][1].repeat(2, 1, 1))


# --- DDIM inversion: invert, then sample back ------------------------------------------------------
# Random tiny networks are no denoisers: their ODE amplifies a small error without bound (measured
# round trips, 25 of 50 steps: tiny SD1.5 UNet 1.3 relative error, tiny Cosmos-Predict2 0.19, Wan 0.11,
# Cosmos 1.0 0.09). The network is therefore replaced by the exact denoiser of Gaussian data, smooth
# and known in closed form, while everything around it is ComfyUI's and the pack's own: the model's
# model_sampling scales the network's input and reads its output, EVS runs the inversion.
MU, S = 0.3, 0.8  # every latent element ~ N(MU, S^2)


def _coefficients(ms, sigma):
    """x = a x0 + b noise at level sigma in the model's sampling space (its noise_scaling)."""
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    return ms.noise_scaling(sigma, zero, one), ms.noise_scaling(sigma, one, zero)


def _exact_denoised(ms, x, sigma):
    a, b = _coefficients(ms, sigma)
    return MU + a * S ** 2 / (a ** 2 * S ** 2 + b ** 2) * (x - a * MU)


def gaussian_denoiser(model):
    """A clone whose network returns what makes ComfyUI's prediction the exact denoiser of the latent
    the network is shown (its input divided by the input scale of the level it is called at)."""
    m = model.clone()
    ms = model.get_model_object("model_sampling")
    level = {}

    def apply_model(executor, x, t, *args, **kwargs):
        level["sigma"] = t
        return executor(x, t, *args, **kwargs)

    def network(executor, x, *args, **kwargs):
        sigma = level["sigma"].view(-1, *[1] * (x.ndim - 1)).to(x)
        seen = x / ms.calculate_input(sigma, torch.ones_like(sigma))
        base = ms.calculate_denoised(sigma, torch.zeros_like(seen), seen)
        slope = ms.calculate_denoised(sigma, torch.ones_like(seen), seen) - base
        return (_exact_denoised(ms, seen, sigma) - base) / slope
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_gaussian_level", apply_model)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_gaussian_network", network)
    return m


def inversion_round_trip(model, x0, positive, scheduler, steps):
    """EVS's inversion (conditional prediction, no CFG) from the clean end to the top of a `steps`-step
    schedule, then ComfyUI's Euler sampler back down the same levels, in one sampling run."""
    from freevideo.enhance_core.methods.evs.sampler import _guider, _program_sampler
    down = sigmas(model, scheduler, steps)
    guider = _guider(Stage(model, positive, positive, 1.0, "euler", scheduler, steps))
    program = _program_sampler([("invert", 0, steps), ("sample", steps, 2 * steps)], comfy.samplers.sampler_object("euler"), guider)
    return guider.sample(torch.zeros_like(x0), x0, program, torch.cat([down.flip(0), down[1:]]), disable_pbar=True, seed=0)


def euler_from_the_exact_top(ms, x0, down):
    """The sampler's own one-way error: the exact probability-flow solution at the top level (for
    Gaussian data an affine map of x0 per element), then Euler with the exact denoiser."""
    a, b = _coefficients(ms, down[:1])
    x = a * MU + (a ** 2 * S ** 2 + b ** 2).sqrt() / S * (x0 - MU)
    for s, n in zip(down[:-1], down[1:]):
        x = x + (x - _exact_denoised(ms, x, s.view(1))) / s * (n - s)
    return x


@pytest.mark.families
@pytest.mark.parametrize("family", ["sd15 epsilon", "wan21 flow", "cosmos1 EDM", "cosmos_predict2 rectified flow"])
def test_inversion_then_sampling_returns_the_input(family, sd15, wan21):
    """50 steps up to the top of the schedule and back. Bound: the round trip may cost at most twice
    the sampler's own one-way discretisation error on the same levels (the inversion is a first-order
    step of the same size). Measured (round trip / bound): SD1.5 0.018 / 0.061, Wan 0.025 / 0.158,
    Cosmos 1.0 0.059 / 0.097, Cosmos-Predict2 0.064 / 0.097. Feeding the network the latent scaled for
    the target level instead (the earlier step) gives 0.17 (SD1.5) and 0.40 (both Cosmos)."""
    from support.families import BY_ID, conditioning, load
    kind = family.split()[0]
    if kind == "sd15":
        model, scheduler, shape, positive = sd15, "normal", (1, 4, 8, 8), text_conditioning(dim=T.SD15_CONTEXT_DIM, seed=1)
    elif kind == "wan21":
        model, scheduler, shape, positive = wan21, "simple", (1, 16, 2, 4, 4), text_conditioning(dim=WAN_DIM, seed=1)
    else:
        model, scheduler, shape, positive = load(BY_ID[kind]), "karras", (1, 16, 2, 4, 4), conditioning(BY_ID[kind], 1)
    steps = 50
    # Errors are measured in the model's own latent space (the guider applies the latent format).
    latent_format = model.get_model_object("latent_format")
    x0 = MU + S * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    error = lambda x: float((x - x0).norm() / x0.norm())  # noqa: E731
    back = latent_format.process_in(inversion_round_trip(gaussian_denoiser(model), latent_format.process_out(x0), positive,
                                                         scheduler, steps))
    ms = model.get_model_object("model_sampling")
    one_way = error(euler_from_the_exact_top(ms, x0.double(), sigmas(model, scheduler, steps).double()))
    print(f"{family}: round trip {error(back):.4f}, sampler one way {one_way:.4f}")
    assert error(back) < 2 * one_way


@pytest.mark.parametrize("case,message", [
    (dict(strength=0.0), "strength: 0.0"),
    (dict(t_T2V=0), "t_T2V: 0 is outside the image run"),
    (dict(t_T2V=3), "t_T2V: 3 is outside the image run"),
    (dict(t_V=3), "t_V: 3 is outside the video schedule"),
    (dict(n_V=3), "n_V: 3 video steps from t_V 2 run past"),
    (dict(latent=torch.randn(1, 4, 4, 4)), "holds a single batch entry"),
    (dict(latent=torch.randn(4, 4, 4)), "is not a video latent"),
    (dict(latent=torch.randn(3, 16, 4, 4)), "has 16 channels"),
    (dict(image_sampler="nope"), "image_sampler: unknown sampler"),
    (dict(sfi=True), r"video_model \(Selective Feature Injection\)"),
    (dict(noise_mask=True), "noise mask"),
])
def test_bad_input_is_a_clear_error_before_sampling(sd15, case, message):
    calls = []
    image = stage(recording(sd15, "image", calls), T.SD15_CONTEXT_DIM, 2.0, 4, sampler=case.get("image_sampler", "euler"))
    video = stage(recording(sd15, "video", calls), T.SD15_CONTEXT_DIM, 1.0, 2)
    latent = {"samples": case.get("latent", sd15_video()["samples"])}
    if case.get("noise_mask"):
        latent["noise_mask"] = torch.ones(1, 4, 4)
    with pytest.raises(ValueError, match=message):
        evs_sample(image, video, latent, case.get("strength", 0.5), case.get("t_T2V", 1), case.get("t_V", 2),
                   case.get("n_V", 1), seed=0, sfi=case.get("sfi", False))
    assert calls == []


@pytest.mark.parametrize("case,message", [
    (dict(), "video_vae and image_vae: required because the video latent .* is temporally compressed"),
    (dict(video_vae="wan"), "image_vae: required"),
    (dict(video_vae="taesd", image_vae="qwen"), "video_vae: makes 4-channel"),
    (dict(video_vae="wan", image_vae="taesd"), "image_vae: makes 4-channel latents; the image model's latent format"),
    (dict(latent=torch.randn(1, 16, 1, 2, 2), video_vae="wan", image_vae="qwen"), "holds a single latent frame"),
    (dict(latent=torch.randn(3, 16, 2, 2), video_vae="wan", image_vae="qwen"), "does not fit the video model"),
    (dict(video_vae="wan", image_vae="qwen", sfi=True, sfi_layers="9"), "sfi_layers: layer 9 does not exist"),
    (dict(video_vae="wan", image_vae="qwen", sfi=True, sfi_gamma=1.5), "sfi_gamma"),
])
def test_incompatible_latents_and_vaes_are_clear_errors_before_sampling(qwen, wan21, vaes, case, message):
    calls = []
    image = stage(recording(qwen, "image", calls), T.QWEN_CONTEXT_DIM, 2.0, 4)
    video = stage(recording(wan21, "video", calls), WAN_DIM, 1.0, 2)
    latent = {"samples": case.get("latent", wan_video()["samples"])}
    with pytest.raises(ValueError, match=message):
        evs_sample(image, video, latent, 0.5, 1, 2, 1, seed=0, image_vae=vaes.get(case.get("image_vae")),
                   video_vae=vaes.get(case.get("video_vae")), sfi=case.get("sfi", False),
                   sfi_gamma=case.get("sfi_gamma", 0.8), sfi_layers=case.get("sfi_layers", "all"))
    assert calls == []


def test_one_progress_bar_with_previews_and_interrupt_between_steps(sd15):
    from comfy.cli_args import args, LatentPreviewMethod
    updates, calls = [], []
    old_hook, old_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total, preview)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        image = stage(recording(sd15, "image", calls), T.SD15_CONTEXT_DIM, 2.0, 6)
        video = stage(recording(sd15, "video", calls), T.SD15_CONTEXT_DIM, 1.0, 3)
        evs_sample(image, video, sd15_video(), 0.5, 2, 2, 1, seed=0)
        assert len(updates) == len(calls) == 2 + 2 + 2  # T2I step + x0_I, block step + x0_IV, T2I steps
        assert [u[:2] for u in updates] == [(i + 1, len(calls)) for i in range(len(calls))]
        assert all(u[2] is not None for u in updates)

        # interrupt during the third model call: the run stops before the next one
        calls.clear()
        stop = lambda c: c != "start" and len(calls) == 3 and comfy.model_management.interrupt_current_processing(True)
        image = stage(recording(sd15, "image", calls, after=stop), T.SD15_CONTEXT_DIM, 2.0, 6)
        video = stage(recording(sd15, "video", calls, after=stop), T.SD15_CONTEXT_DIM, 1.0, 3)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            evs_sample(image, video, sd15_video(), 0.5, 2, 2, 1, seed=0)
        assert len(calls) == 3
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old_hook)
        args.preview_method = old_method


@pytest.mark.parametrize("image_sampler,image_scheduler,video_sampler,video_scheduler", [
    ("dpmpp_2m", "karras", "heun", "normal"),
    ("uni_pc", "simple", "euler_ancestral", "sgm_uniform"),
])
def test_other_comfyui_samplers_run_in_both_stages(sd15, image_sampler, image_scheduler, video_sampler, video_scheduler):
    calls = []
    image = stage(recording(sd15, "image", calls), T.SD15_CONTEXT_DIM, 2.0, 6, image_sampler, image_scheduler)
    video = stage(recording(sd15, "video", calls), T.SD15_CONTEXT_DIM, 1.0, 3, video_sampler, video_scheduler)
    out, _ = evs_sample(image, video, sd15_video(), 0.5, 2, 2, 1, seed=0)
    assert torch.isfinite(out["samples"]).all() and not torch.equal(out["samples"], sd15_video()["samples"])
    full = comfy.samplers.KSampler(sd15, 6, "cpu", sampler=image_sampler, scheduler=image_scheduler).sigmas
    assert calls[0].tag == "image" and calls[0].sigma == pytest.approx(float(full[3]), rel=1e-5)
    assert calls[-1].tag == "image" and [c.tag for c in calls].count("video") >= 2


def test_node_schema_execute_and_workflows(sd15):
    from freevideo.nodes import NODES
    from freevideo.nodes.evs_sampler import EVSSampler
    assert EVSSampler in NODES
    schema = EVSSampler.define_schema()
    assert all(i.tooltip for i in schema.inputs)
    c = text_conditioning(dim=T.SD15_CONTEXT_DIM)
    out = EVSSampler.execute(sd15_video(), sd15, c, c, sd15, c, c, seed=1, image_steps=4, image_cfg=1.0,
                             image_sampler="euler", image_scheduler="normal", strength=0.5, t_T2V=1, video_steps=2,
                             video_cfg=1.0, video_sampler="euler", video_scheduler="sgm_uniform", t_V=2, n_V=1,
                             sfi=False, sfi_gamma=0.8, sfi_layers="all", sfi_setting="custom (sfi_layers, sfi_gamma)")
    assert out.result[0]["samples"].shape == (3, 4, 4, 4) and out.result[1] is None
    # The node passes its inputs through unchanged: the same result as the function called directly.
    direct, _ = evs_sample(Stage(sd15, c, c, 1.0, "euler", "normal", 4), Stage(sd15, c, c, 1.0, "euler", "sgm_uniform", 2),
                           sd15_video(), 0.5, 1, 2, 1, seed=1)
    assert torch.equal(out.result[0]["samples"], direct["samples"])
    # workflows: the EVS node's widget values follow the schema's widget inputs (seed adds its control)
    widgets = [i.id for i in schema.inputs if type(i).__name__ == "Input" and i.get_io_type() in
               ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
    for path in sorted((ROOT / "workflows").glob("*evs*.json")):
        data = json.loads(path.read_text())
        nodes = [n for n in data["nodes"] if n["type"] == "FreeVideoEVSSampler"]
        assert nodes, path
        for n in nodes:
            assert len(n["widgets_values"]) == len(widgets) + 1, path
            assert n["widgets_values"][widgets.index("seed") + 1] in ("fixed", "randomize", "increment", "decrement")
