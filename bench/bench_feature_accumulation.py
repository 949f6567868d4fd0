"""Cross-layer feature accumulation overhead at the Enhance-A-Video benchmark's size: sampling time
and peak memory of the plain model and of the node in both modes, on the same Wan-shaped model
(Wan 2.1 1.3B width: dim 1536, 12 heads, FFN 8960; 4 layers so that some layers average more than
their own input) sampling 21 latent frames of 30x52 (8190 tokens), CFG 5 (cond and uncond batched).

Each measurement runs in a fresh process (peak memory is per process); the configurations are
interleaved and rotate their order; the report gives medians and ratios from this one run, and the
extra peak memory against the size of one hidden state (batch x tokens x dim, float32).

    .runtime/venv/bin/python bench/bench_feature_accumulation.py [--repeats 3] [--layers 4] [--steps 2]
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_enhance_a_video import interleaved_runs, paired_ratios, timed_sampling, wan_bench_model  # noqa: E402

CONFIGS = {"plain": None, "attention input": "attention input", "block input": "block input"}


def measure(config: str, layers: int, steps: int, frames: int, height: int, width: int, gate: str) -> dict:
    model = wan_bench_model(layers)
    import torch
    from freevideo.enhance_core.methods.feature_accumulation import apply_feature_accumulation
    if CONFIGS[config] is not None:
        model = apply_feature_accumulation(model, gate, 6, CONFIGS[config])
    return timed_sampling(config, model, {"samples": torch.zeros(1, 16, frames, height, width)}, steps)


def accumulation_cost(tokens: int, repeats: int = 5) -> float:
    """Median seconds of one block's accumulation work on a hidden state of this size (cond +
    uncond, on the model's device in its dtype): add the block's output to the running sum and mix
    the next block's input in place. Set against the plain run's time per block call, it is the part
    of the overhead that does not drown in a shared machine's noise."""
    # The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from support import in_process
    in_process.setup()
    import time
    import torch
    import comfy.model_management
    from freevideo.enhance_core.methods.feature_accumulation import GroupAccumulator
    device = comfy.model_management.get_torch_device()  # where the sampled model runs (a GPU in the run book)
    dtype = comfy.model_management.unet_dtype()
    g = torch.Generator().manual_seed(0)
    out, h = (torch.randn(2, tokens, 1536, generator=g).to(device, dtype) for _ in range(2))
    acc = GroupAccumulator(6)
    acc.add(0, out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc.add(1, out)
        acc.mix(h, 0.1, in_place=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=30)
    parser.add_argument("--width", type=int, default=52)
    parser.add_argument("--gate", default="0.1")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    shape = dict(layers=a.layers, steps=a.steps, frames=a.frames, height=a.height, width=a.width, gate=a.gate)
    if a.child:
        print(json.dumps(measure(a.child, **shape)))
        return
    tokens = a.frames * (a.height // 2) * (a.width // 2)
    hidden = 2 * tokens * 1536 * 4
    print(f"Wan-shaped model, dim 1536, {a.layers} layers, latent {a.frames}x{a.height}x{a.width} ({tokens} tokens), "
          f"{a.steps} steps, CFG 5 (cond+uncond batched), SDPA attention, {os.cpu_count()} CPU threads; gate {a.gate}, "
          f"groups of 6; one hidden state = {hidden / 2**20:.0f} MiB")
    names = list(CONFIGS)
    results = interleaved_runs(__file__, names, shape, a.repeats)
    med = {c: statistics.median(m["seconds"] for m in ms) for c, ms in results.items()}
    peak = {c: statistics.median(m["peak"] for m in ms) for c, ms in results.items()}
    work = {c: statistics.median(m["peak"] - m["base"] for m in ms) for c, ms in results.items()}
    for c in names[1:]:
        print(f"{c}: median time {med[c]:.2f} s vs plain {med['plain']:.2f} s, ratio {med[c] / med['plain']:.4f} "
              f"(median of per-round ratios: wall {statistics.median(paired_ratios(results, c)):.4f}, "
              f"CPU {statistics.median(paired_ratios(results, c, 'cpu')):.4f}); "
              f"median peak RSS ratio {peak[c] / peak['plain']:.4f}, sampling working set "
              f"{(work[c] - work['plain']) / 2**20:+.0f} MiB vs plain ({(work[c] - work['plain']) / hidden:+.2f} hidden states)")
    per_block = med["plain"] / (a.steps * a.layers)
    cost = accumulation_cost(tokens)
    print(f"per block call: accumulation {cost * 1000:.1f} ms vs the plain block call {per_block * 1000:.0f} ms "
          f"(plain sampling time / (steps x layers)): ratio {cost / per_block:.4f}")


if __name__ == "__main__":
    main()
