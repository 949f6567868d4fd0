"""EVS sampler cost on the CPU with the tests' tiny models, at the paper's step settings (image
model: 50-step schedule, strength 0.4 = 20 steps, [T2V] block inserted at image step 10; video
model: 8-step schedule, t_V = n_V = 4).

1. Overhead: wall time of the EVS node / the sum of its model calls and VAE calls, each replayed
   alone (the same inputs, one call at a time, outside any sampler). Goal <= 1.05. The machine is
   shared, so the same ratio is also given against the calls' own durations timed inside the run
   (contention hits both sides of that ratio alike).
2. EVS against the two basic compositions built from plain ComfyUI nodes (KSampler with denoise,
   VAEDecode / VAEEncode between the models where the latents differ): T2I then T2V, T2V then T2I.

Two pairings: "direct" (tiny SD1.5-layout UNet as the image model and as the stand-in video model,
frames as batch entries, as SD1.5 + AnimateDiff; no motion module is inserted) and "pixels" (the same
image model with its TAESD-layout VAE, tiny Wan 2.1 T2V with its tiny Wan VAE as the video model).
Configurations are interleaved, their order alternates per round; medians and ratios of one run.

    .runtime/venv/bin/python bench/bench_evs.py [--repeats 3] [--frames 9] [--size 8] [--threads 0]

The direct pairing's video is frames x 4 x size x size; the pixel pairing's is the Wan latent
1 x 16 x ((frames - 1) // 4 + 1) x size x size (frames pixel frames of 8*size pixels).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMAGE_STEPS, STRENGTH, T_T2V, VIDEO_STEPS, T_V, N_V = 50, 0.4, 10, 8, 4, 4


def setup():
    # The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
    sys.path.append(str(ROOT))
    from support import in_process
    in_process.setup()


class Log:
    """Model and VAE calls of one run, with their inputs for the replay, and their durations."""

    def __init__(self):
        self.model_calls, self.vae_calls = [], []
        self.seconds = 0.0


def logged_model(model, log):
    import comfy.patcher_extension
    m = model.clone()

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        t0 = time.perf_counter()
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if log.model_calls is not None:
            log.model_calls.append((m.model, (x, t, c_concat, c_crossattn, control), kwargs))
            log.seconds += time.perf_counter() - t0
        return out
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_log", wrapper)
    return m


def logged_vae(vae, log):
    """The bench's own VAE with its encode/decode calls logged (instance attributes on an object the
    bench made; nothing a user passes in)."""
    for name in ("encode", "decode"):
        method = getattr(vae, name)

        def call(samples, _method=method, **kw):
            t0 = time.perf_counter()
            out = _method(samples, **kw)
            if log.vae_calls is not None:
                log.vae_calls.append((_method, samples))
                log.seconds += time.perf_counter() - t0
            return out
        setattr(vae, name, call)
    return vae


def replay_seconds(log) -> float:
    """Each logged call again, alone, timed one by one."""
    total = 0.0
    for base, args, kwargs in log.model_calls:
        t0 = time.perf_counter()
        base._apply_model(*args, transformer_options={}, **kwargs)
        total += time.perf_counter() - t0
    for method, samples in log.vae_calls:
        t0 = time.perf_counter()
        method(samples)
        total += time.perf_counter() - t0
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=9, help="pixel frames of the videos (4k+1 for the Wan latent)")
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is steadier "
                        "on a machine shared with other jobs")
    opts = parser.parse_args()
    setup()
    import torch
    import nodes
    from support import tiny_image_models as T
    from support import tiny_models
    from support.sampling import text_conditioning
    from freevideo.nodes.evs_sampler import EVSSampler

    torch.set_grad_enabled(False)
    torch.set_flush_denormal(True)  # random weights: denormals would make some configurations look slower
    if opts.threads:
        torch.set_num_threads(opts.threads)
    log = Log()
    sd15 = logged_model(T.sd15_unet(), log)
    wan = logged_model(tiny_models.load_diffusion_model(tiny_models.wan21_t2v()), log)
    taesd = logged_vae(T.taesd_vae(), log)
    wan_vae = logged_vae(tiny_models.load_vae(tiny_models.wan21_vae(0)), log)
    g = torch.Generator().manual_seed(0)
    sd_c = text_conditioning(dim=T.SD15_CONTEXT_DIM, seed=1), text_conditioning(dim=T.SD15_CONTEXT_DIM, seed=2)
    wan_c = text_conditioning(dim=4096, seed=1), text_conditioning(dim=4096, seed=2)
    pairings = {
        # name: image model, its conds, video model, its conds, video latent, image vae, video vae
        "direct": (sd15, sd_c, sd15, sd_c, torch.randn(opts.frames, 4, opts.size, opts.size, generator=g), None, None),
        "pixels": (sd15, sd_c, wan, wan_c, torch.randn(1, 16, (opts.frames - 1) // 4 + 1, opts.size, opts.size, generator=g),
                   taesd, wan_vae),
    }
    image_cfg, video_cfg = 7.5, 1.0

    def evs(p):
        image, (ip, ineg), video, (vp, vneg), latent, ivae, vvae = p
        out = EVSSampler.execute({"samples": latent}, image, ip, ineg, video, vp, vneg, seed=1, image_steps=IMAGE_STEPS,
                                 image_cfg=image_cfg, image_sampler="euler", image_scheduler="normal", strength=STRENGTH,
                                 t_T2V=T_T2V, video_steps=VIDEO_STEPS, video_cfg=video_cfg, video_sampler="euler",
                                 video_scheduler="sgm_uniform", t_V=T_V, n_V=N_V, sfi=False, sfi_gamma=0.8,
                                 sfi_layers="all", image_vae=ivae, video_vae=vvae)
        return out.result[0]

    def image_pass(p, latent):
        image, (ip, ineg) = p[0], p[1]
        steps = round(STRENGTH * IMAGE_STEPS)  # KSampler: steps / denoise = the 50-step schedule
        return nodes.KSampler().sample(image, 1, steps, image_cfg, "euler", "normal", ip, ineg, latent, denoise=STRENGTH)[0]

    def video_pass(p, latent):
        video, (vp, vneg) = p[2], p[3]
        return nodes.KSampler().sample(video, 1, T_V, video_cfg, "euler", "sgm_uniform", vp, vneg, latent,
                                       denoise=T_V / VIDEO_STEPS)[0]

    def to_video(p, latent):
        if p[5] is None:
            return latent
        return nodes.VAEEncode().encode(p[6], nodes.VAEDecode().decode(p[5], latent)[0])[0]

    def to_image(p, latent):
        if p[5] is None:
            return latent
        return nodes.VAEEncode().encode(p[5], nodes.VAEDecode().decode(p[6], latent)[0])[0]

    def t2i_t2v(p):
        return video_pass(p, to_video(p, image_pass(p, to_image(p, {"samples": p[4]}))))

    def t2v_t2i(p):
        return to_video(p, image_pass(p, to_image(p, video_pass(p, {"samples": p[4]}))))

    configs = [("EVS", evs), ("T2I+T2V", t2i_t2v), ("T2V+T2I", t2v_t2i)]
    times = {(pn, cn): [] for pn in pairings for cn, _ in configs}
    replay = {pn: [] for pn in pairings}
    inside = {key: [] for key in times}
    calls = {}
    for name, p in pairings.items():  # warm-up: loads, caches, first-call costs
        for cn, fn in configs:
            fn(p)
    for r in range(opts.repeats):
        for name, p in pairings.items():
            order = configs if r % 2 == 0 else configs[::-1]
            for cn, fn in order:
                log.model_calls, log.vae_calls, log.seconds = [], [], 0.0
                t0 = time.perf_counter()
                fn(p)
                times[(name, cn)].append(time.perf_counter() - t0)
                inside[(name, cn)].append(log.seconds)
                if cn == "EVS":
                    logged = Log()
                    logged.model_calls, logged.vae_calls = log.model_calls, log.vae_calls
                    log.model_calls = log.vae_calls = None  # the replay itself is not logged
                    replay[name].append(replay_seconds(logged))
                    calls[name] = (len(logged.model_calls), len(logged.vae_calls))
                log.model_calls = log.vae_calls = None
        print(f"round {r + 1}/{opts.repeats} done", file=sys.stderr, flush=True)

    med = lambda xs: statistics.median(xs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, SDPA; {opts.repeats} rounds, medians")
    print(f"settings: image 50-step schedule, strength {STRENGTH}, t_T2V {T_T2V}; video {VIDEO_STEPS}-step schedule, "
          f"t_V {T_V}, n_V {N_V}; cfg image {image_cfg} / video {video_cfg}; euler")
    for name, p in pairings.items():
        shape = tuple(p[4].shape)
        evs_t = med(times[(name, "EVS")])
        print(f"\n[{name}] video latent {shape}; EVS model calls {calls[name][0]}, VAE calls {calls[name][1]}")
        alone = [a / b for a, b in zip(times[(name, "EVS")], replay[name])]
        situ = [a / b for a, b in zip(times[(name, "EVS")], inside[(name, "EVS")])]
        print(f"  EVS node {evs_t:.2f} s; its model + VAE calls replayed alone {med(replay[name]):.2f} s, "
              f"timed inside the run {med(inside[(name, 'EVS')]):.2f} s")
        print(f"  node / calls alone: median {med(alone):.3f} (rounds: {', '.join(f'{r:.3f}' for r in alone)})")
        print(f"  node / calls inside the run: median {med(situ):.3f} (rounds: {', '.join(f'{r:.3f}' for r in situ)})")
        for cn, _ in configs:
            t = med(times[(name, cn)])
            rounds = ", ".join(f"{x:.2f}" for x in times[(name, cn)])
            own = med([a / b for a, b in zip(times[(name, cn)], inside[(name, cn)])])
            print(f"  {cn:8s} {t:6.2f} s   {t / evs_t:.2f}x EVS   wall / its calls inside the run {own:.3f}   (rounds: {rounds})")


if __name__ == "__main__":
    main()
