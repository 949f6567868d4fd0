"""IE-Adapt video editing cost on CPU, ComfyUI with SDPA attention (as on GPUs).

Per-step time of edited sampling / plain sampling, at CFG 1 (cond only) and CFG > 1 (cond and
uncond batched), against the goal: the batch elements per step with editing / without (the source
branch beside the target: 2x at either CFG) plus 5%. Steady-state steps (after the first step, which
also measures the source's entropy, and with a real source latent DDIM-inverts it); the first step
is reported on its own. Runs interleaved, order alternated, medians; the ratios come from one run.
Each step is timed twice: wall time, and the process's CPU time (all threads), which on a shared,
loaded machine tracks the work done better than wall time does.

Two sources: generated (no source latent; the source follows the sampler's own trajectory) and a
real video's latent (inverted once before the first step, one source model call per schedule level; the
target then starts from the inverted latent).

Model and latent: as bench_entropy_guidance.py (Wan 2.1 layout, head dim 128, smaller width and
depth; 2 x 60 x 104 latent = 3120 tokens, 512 text tokens), its set-up reused.

    source .runtime/env.sh && $FREEVIDEO_PYTHON bench/bench_entropy_editing.py [--rounds 3] [--steps 4] [--frames 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_entropy_guidance as setup  # noqa: E402  (sets up ComfyUI in process)

import torch  # noqa: E402

from freevideo.enhance_core.methods.entropy_editing import apply_entropy_editing  # noqa: E402
from support.sampling import text_conditioning  # noqa: E402

CFGS = (1.0, 5.0)
CLOCKS = ("wall", "CPU")


class _Clocks:
    """Stands in for the `time` module in the set-up's run(): each stamp is (wall, CPU) seconds, so
    its step durations (differences of stamps) are (wall, CPU) pairs."""

    @staticmethod
    def perf_counter():
        return torch.tensor([time.perf_counter(), time.process_time()], dtype=torch.float64)


setup.time = _Clocks


def step_ratios(base, rounds, steps, cfg, target, negative, source, frames):
    latent = {"samples": torch.randn(1, 16, frames, setup.HEIGHT, setup.WIDTH, generator=torch.Generator().manual_seed(5))}
    configs = {
        "plain": base,
        "edited (generated source)": apply_entropy_editing(base, source, ratio=0.5),
        "edited (real video source)": apply_entropy_editing(base, source, source_latent=latent, ratio=0.5),
    }
    counted = {name: setup.count_model_calls(m) for name, m in configs.items()}
    steady = {name: [] for name in configs}
    first = {name: [] for name in configs}
    elements, first_calls = {}, {}
    names = list(configs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            model, calls = counted[name]
            calls.clear()
            durations, per_steps = setup.run(model, steps, cfg, target, negative, calls, frames=frames)
            durations = [d.tolist() for d in durations]
            first[name].append(durations[0])
            steady[name] += durations[1:]
            elements[name] = sum(per_steps[-1])
            first_calls[name] = per_steps[0]
            print(f"  CFG {cfg:g} round {r} {name:27s} steps (wall, CPU) "
                  f"{[f'{w:.2f}, {c:.2f}' for w, c in durations]} s; model call batch sizes per step {per_steps}", flush=True)
    results = {}
    for i, clock in enumerate(CLOCKS):
        median = {name: statistics.median(d[i] for d in steady[name]) for name in names}
        median_first = {name: statistics.median(d[i] for d in first[name]) for name in names}
        print(f"\nCFG {cfg:g}, {clock} time per step (median of {len(steady['plain'])} steady-state steps per config; "
              f"first step apart):")
        print(f"  {'config':27s} {'s/step':>7s} {'ratio':>6s} {'goal':>5s} {'ratio/goal':>10s} {'first step':>10s} "
              f"{'ratio':>6s}  first step's model calls")
        for name in names:
            t, f = median[name], median_first[name]
            goal = elements[name] / elements["plain"]
            results[(clock, name)] = (t / median["plain"], goal)
            print(f"  {name:27s} {t:7.2f} {t / median['plain']:6.3f} {goal:5.2f} {t / median['plain'] / goal:10.3f} "
                  f"{f:10.2f} {f / median_first['plain']:6.2f}  {first_calls[name]}")
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=setup.FRAMES, help="latent frames (1 halves the tokens)")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    # Random weights can produce denormal floats, which CPUs compute many times slower.
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model dim {setup.DIM} ({setup.DIM // 128} heads x 128), "
          f"{setup.LAYERS} layers, ffn {setup.FFN}; latent {opts.frames}x{setup.HEIGHT}x{setup.WIDTH} -> "
          f"{opts.frames * setup.HEIGHT * setup.WIDTH // 4} tokens; 512 text tokens; euler, {opts.steps} steps", flush=True)
    base = setup.bench_model()
    target, negative = text_conditioning(tokens=512, seed=1), text_conditioning(tokens=512, seed=2)
    source = text_conditioning(tokens=512, seed=3)
    summary = {cfg: step_ratios(base, opts.rounds, opts.steps, cfg, target, negative, source, opts.frames)
               for cfg in CFGS}
    print("\nGoal: steady-state step ratio <= batch-element ratio x 1.05")
    for cfg, results in summary.items():
        for (clock, name), (ratio, goal) in results.items():
            if name != "plain":
                verdict = "met" if ratio <= goal * 1.05 else "NOT met"
                print(f"  CFG {cfg:g} {clock:4s} {name:27s} {ratio:.3f} vs {goal * 1.05:.2f}: {verdict}")


if __name__ == "__main__":
    main()
