"""Enhance-A-Video overhead at a realistic token count: sampling time and peak memory with and
without the node, and with KJNodes' WanVideoEnhanceAVideoKJ (the peer users compare with), on a
Wan-shaped model (Wan 2.1 1.3B width: dim 1536, 12 heads, FFN 8960; only a few layers) sampling 21
latent frames of 30x52 (8190 tokens: 81 frames at 480x832).

Each measurement runs in a fresh process (peak memory is per process); the configurations are
interleaved and rotate their order; the report gives medians and ratios from this one run. KJNodes
comes from FREEVIDEO_PEERS (default ../shared/peers beside the repository); without it that
configuration is left out, with a message.

    .runtime/venv/bin/python bench/bench_enhance_a_video.py [--repeats 3] [--layers 2] [--steps 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("FREEVIDEO_PEERS", ROOT.parent / "shared" / "peers"))


def kjnodes_enhance():
    """KJNodes' Enhance-A-Video node class, loaded from the unmodified snapshot, or None."""
    import importlib.util
    import tarfile
    import tempfile
    tarballs = sorted(PEERS.glob("ComfyUI-KJNodes-*.tar.gz"))
    if not tarballs:
        return None
    dest = Path(tempfile.mkdtemp(prefix="kjnodes-"))
    with tarfile.open(tarballs[0]) as tf:
        tf.extractall(dest, filter="data")
    (source,) = dest.glob("*/nodes/model_optimization_nodes.py")
    spec = importlib.util.spec_from_file_location("kjnodes_model_optimization", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WanVideoEnhanceAVideoKJ


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def wan_bench_model(layers: int):
    """The Wan-shaped benchmark model (1.3B width, `layers` layers, seeded random weights) through
    ComfyUI's loader, in this process, CPU threads as the machine has, denormals flushed."""
    # The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
    sys.path.append(str(ROOT))
    from support import in_process
    in_process.setup()
    import torch
    import comfy.ops
    import comfy.sd
    from comfy.ldm.wan.model import WanModel
    from support import tiny_models

    torch.set_num_threads(os.cpu_count())
    # Random weights can produce denormal floats, which CPUs compute many times slower; a scaled run
    # then looks faster than the plain one. GPUs flush them; so does the benchmark.
    torch.set_flush_denormal(True)
    net = WanModel(model_type="t2v", in_dim=16, dim=1536, ffn_dim=8960, text_dim=4096, out_dim=16, num_heads=12,
                   num_layers=layers, operations=comfy.ops.disable_weight_init)
    tiny_models.init_weights(net)
    model = comfy.sd.load_diffusion_model_state_dict(net.state_dict())
    del net
    return model


def timed_sampling(config: str, model, latent: dict, steps: int) -> dict:
    """Seconds and peak RSS of one KSampler run (CFG 5) after a warm-up that loads the model."""
    import torch
    from support.sampling import ksample, text_conditioning
    pos, neg = text_conditioning(seed=1), text_conditioning(seed=2)
    # Warm-up (loads the model) on a small latent with the same frame count: KJNodes' node fixes the
    # frame count when it runs.
    ksample(model, {"samples": torch.zeros(1, 16, latent["samples"].shape[2], 8, 8)}, pos, neg, steps=1)
    base = rss_bytes()
    with PeakRSS() as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        ksample(model, latent, pos, neg, steps=steps, cfg=5.0)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"config": config, "seconds": seconds, "cpu": cpu, "peak": peak.peak, "base": base}


def interleaved_runs(script: str, configs: list[str], shape: dict, repeats: int) -> dict:
    """Each configuration measured `repeats` times, each in a fresh process (`script --child config`,
    which prints timed_sampling's result as its last line); the order rotates every round."""
    results = {c: [] for c in configs}
    for r in range(repeats):
        for config in configs[r % len(configs):] + configs[:r % len(configs)]:
            cmd = [sys.executable, script, "--child", config] + [f"--{k}={v}" for k, v in shape.items()]
            m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            results[config].append(m)
            print(f"  run {r + 1} {config:16s} {m['seconds']:7.2f} s (CPU {m['cpu']:7.2f} s)  peak {m['peak'] / 2**30:6.3f} GiB",
                  flush=True)
    return results


def paired_ratios(results: dict, config: str, key: str = "seconds") -> list[float]:
    """config / plain within each round (the two ran next to each other): less exposed to a shared
    machine's slow drifts than a ratio of medians."""
    return [m[key] / p[key] for m, p in zip(results[config], results["plain"])]


def measure(config: str, layers: int, steps: int, frames: int, height: int, width: int) -> dict:
    """One measurement in this process: build the model through ComfyUI's loader, sample once."""
    model = wan_bench_model(layers)
    import torch
    from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
    latent = {"samples": torch.zeros(1, 16, frames, height, width)}
    if config == "enhance":
        model = apply_enhance_a_video(model, weight=4.0)
    elif config == "kjnodes":
        (model,) = kjnodes_enhance()().enhance(model, 4.0, latent)
    return timed_sampling(config, model, latent, steps)


def component_ratio(heads: int, frames: int, height: int, width: int, repeats: int = 5) -> tuple[float, float]:
    """Median time of the CFI computation and of one SDPA kernel on the same q, k (cond + uncond),
    interleaved: the part of the overhead that does not drown in a shared machine's noise."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("cfi", ROOT / "enhance_core" / "cross_frame_intensity.py")
    cfi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfi)
    tokens = frames * (height // 2) * (width // 2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, tokens, heads, 128, generator=g) for _ in range(3))
    t_cfi, t_attn = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cfi.enhance_scale(q, k, frames, 4.0)
        t1 = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        t2 = time.perf_counter()
        t_cfi.append(t1 - t0)
        t_attn.append(t2 - t1)
    return statistics.median(t_cfi), statistics.median(t_attn)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=30)
    parser.add_argument("--width", type=int, default=52)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    shape = dict(layers=a.layers, steps=a.steps, frames=a.frames, height=a.height, width=a.width)
    if a.child:
        print(json.dumps(measure(a.child, **shape)))
        return
    tokens = a.frames * (a.height // 2) * (a.width // 2)
    print(f"Wan-shaped model, dim 1536, {a.layers} layers, latent {a.frames}x{a.height}x{a.width} ({tokens} tokens), "
          f"{a.steps} steps, CFG 5 (cond+uncond batched), SDPA attention, {os.cpu_count()} CPU threads")
    configs = ["plain", "enhance"]
    if sorted(PEERS.glob("ComfyUI-KJNodes-*.tar.gz")):
        configs.append("kjnodes")
    else:
        print(f"  KJNodes left out: no ComfyUI-KJNodes-*.tar.gz in {PEERS} (set FREEVIDEO_PEERS)")
    results = interleaved_runs(__file__, configs, shape, a.repeats)
    med = {c: statistics.median(m["seconds"] for m in ms) for c, ms in results.items()}
    peak = {c: statistics.median(m["peak"] for m in ms) for c, ms in results.items()}
    work = {c: statistics.median(m["peak"] - m["base"] for m in ms) for c, ms in results.items()}
    for c in configs[1:]:
        name = {"enhance": "ours", "kjnodes": "KJNodes"}[c]
        print(f"median sampling time: plain {med['plain']:.2f} s, {name} {med[c]:.2f} s, "
              f"ratio {med[c] / med['plain']:.4f} (overhead {100 * (med[c] / med['plain'] - 1):+.2f}%); "
              f"median of per-round ratios: wall {statistics.median(paired_ratios(results, c)):.4f}, "
              f"CPU {statistics.median(paired_ratios(results, c, 'cpu')):.4f}")
    c, k = component_ratio(12, a.frames, a.height, a.width)
    print(f"per layer call: CFI {c * 1000:.0f} ms vs the SDPA kernel on the same q, k, v {k * 1000:.0f} ms "
          f"(ratio {c / k:.4f}; the kernel is only part of a layer)")
    for c in configs[1:]:
        print(f"median peak RSS: plain {peak['plain'] / 2**30:.3f} GiB, {c} {peak[c] / 2**30:.3f} GiB, "
              f"ratio {peak[c] / peak['plain']:.4f}; sampling working set (peak - RSS before sampling) "
              f"ratio {work[c] / work['plain']:.4f}")


if __name__ == "__main__":
    main()
