"""IE-Adapt cost on CPU, ComfyUI with SDPA attention (as on GPUs).

1. Per-step wall time of guided sampling / plain CFG sampling for each branch pair, against the goal
   (batch elements per step with guidance) / (without) = 3/2 for pairs with 'original', 4/2 for
   uniform/identity. Steady-state steps (after the registry step), runs interleaved, order
   alternated, medians.
2. Registry cost: the sampled entropy estimate of every self-attention layer (the conditional
   element's q, k as recorded in a real forward) against one conditional model call, at 9 latent
   frames (33 video frames at 480p, 14040 tokens; the estimate's share falls as 1 / tokens).
3. The same at one layer of Wan 2.1 1.3B shape (12 heads x 128, 480p grid): estimate / that layer's
   attention kernel.

Model: Wan 2.1 layout with head dim 128 as in the real models, smaller width and depth so that a CPU
step takes seconds; latent 2 x 60 x 104 (2 latent frames of a 480p grid: 3120 tokens), 512 text
tokens. Attention is ~65% of a layer's work here (~70% in Wan 1.3B at 81 frames). With 6 layers,
the branch elements' skipped attention at the one registered layer saves more than with Wan's 30.

    source .runtime/env.sh && $FREEVIDEO_PYTHON bench/bench_entropy_guidance.py [--rounds 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
sys.path.append(str(ROOT))
from support import in_process  # noqa: E402

in_process.setup()

import torch  # noqa: E402

import comfy.sample  # noqa: E402
from freevideo.enhance_core.measures.attention_entropy import DEFAULT_ROWS, attention_entropy  # noqa: E402
from freevideo.enhance_core.patching.attention_slot import add_attention_override  # noqa: E402
from freevideo.enhance_core.methods.entropy_guidance import PAIRS, apply_entropy_guidance  # noqa: E402
from support import tiny_models  # noqa: E402
from support.sampling import counting_model_calls, text_conditioning  # noqa: E402

DIM, LAYERS, FFN = 256, 6, 1024
FRAMES, HEIGHT, WIDTH = 2, 60, 104
REGISTRY_FRAMES = 9  # 33 video frames at 480p: 14040 tokens, the short end of real Wan use


def run(model, steps, cfg, positive, negative, calls=None, frames=FRAMES):
    """Seconds per step; with `calls` (a counting_model_calls list) also the batch sizes of each step's model calls."""
    latent = torch.zeros(1, 16, frames, HEIGHT, WIDTH)
    noise = comfy.sample.prepare_noise(latent, 0)
    stamps, marks = [time.perf_counter()], [0]

    def callback(*a):
        stamps.append(time.perf_counter())
        marks.append(len(calls) if calls is not None else 0)
    comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                        callback=callback, disable_pbar=True, seed=0)
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    if calls is None:
        return durations
    return durations, [calls[a:b] for a, b in zip(marks, marks[1:])]


def step_ratios(base, rounds, steps, positive, negative, layer):
    """Ours at a fixed layer (each pair) against ComfyUI's SkipLayerGuidanceDiT skipping the same
    layer (one extra forward per step over the whole window), in one interleaved run."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT
    configs = {"plain CFG": base}
    for pos, neg in PAIRS:
        configs[f"{pos}/{neg}"] = apply_entropy_guidance(base, 1.0, pos, neg, layers=str(layer))
    configs["ComfyUI SLG-DiT"] = SkipLayerGuidanceDiT.execute(base, 3.0, 0.0, 1.0, double_layers=str(layer),
                                                              single_layers="").result[0]
    counted = {name: counting_model_calls(m) for name, m in configs.items()}
    times = {name: [] for name in configs}
    elements = {}
    names = list(configs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            model, calls = counted[name]
            calls.clear()
            durations, per_steps = run(model, steps, 4.0, positive, negative, calls)
            times[name] += durations[1:]  # steady state: after the registry step (and model loading)
            per_step = per_steps[-1]
            elements[name] = (len(per_step), sum(per_step))
            print(f"  round {r} {name:18s} steps {['%.2f' % d for d in durations]} s; model call batch sizes per step "
                  f"{per_steps}", flush=True)
    plain = statistics.median(times["plain CFG"])
    print(f"\nPer step (median of steady-state steps), guidance at layer {layer} of {LAYERS}; with shared prefixes "
          f"(Wan) a branch costs about ({LAYERS} - {layer}) / {LAYERS} = {(LAYERS - layer) / LAYERS:.2f} of an element:")
    print(f"  {'config':18s} {'s/step':>7s} {'ratio':>6s} {'goal':>5s} {'ratio/goal':>10s}")
    for name in names:
        t = statistics.median(times[name])
        goal = elements[name][1] / elements["plain CFG"][1]
        print(f"  {name:18s} {t:7.2f} {t / plain:6.3f} {goal:5.2f} {t / plain / goal:10.3f}")


def registry_cost(base, positive, reps):
    m = base.clone()
    qk = []

    def record(call_next, q, k, v, heads, **kwargs):
        if q.shape[1] == k.shape[1]:  # self-attention (cross-attention keys are the 512 text tokens)
            b, n, _ = q.shape
            qk.append((q.view(b, n, heads, -1).transpose(1, 2).clone(), k.view(b, n, heads, -1).transpose(1, 2).clone()))
        return call_next(q, k, v, heads, **kwargs)
    add_attention_override(m, "test_recorder", record)
    run(m, 1, 1.0, positive, positive, frames=REGISTRY_FRAMES)
    assert len(qk) == LAYERS
    call, est = [], []
    for r in range(reps):
        call += run(base, 1, 1.0, positive, positive, frames=REGISTRY_FRAMES)  # one conditional model call (CFG 1)
        t = time.perf_counter()
        for q, k in qk:
            attention_entropy(q, k, rows=DEFAULT_ROWS)
        est.append(time.perf_counter() - t)
    t = time.perf_counter()
    attention_entropy(*qk[0], rows=None)
    exact = (time.perf_counter() - t) * len(qk)  # one layer, times the layer count
    c = statistics.median(call)
    print(f"\nRegistry ({LAYERS} layers, {qk[0][0].shape[2]} tokens, {qk[0][0].shape[1]} heads): one conditional model call "
          f"{c:.2f} s; sampled estimate ({DEFAULT_ROWS} rows/head) {statistics.median(est):.3f} s = "
          f"{statistics.median(est) / c:.1%} of it; exact ~{exact:.2f} s = {exact / c:.1%}")


def layer_cost(reps):
    heads, d, n = 12, 128, 5 * 30 * 52  # Wan 1.3B heads; 480p, 5 latent frames (17 video frames)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    kernel, est = [], []
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        kernel.append(time.perf_counter() - t)
        t = time.perf_counter()
        attention_entropy(q, k, rows=DEFAULT_ROWS)
        est.append(time.perf_counter() - t)
    a, e = statistics.median(kernel), statistics.median(est)
    print(f"\nOne Wan-1.3B-shaped layer ({heads} heads x {d}, {n} tokens): attention kernel {a:.2f} s, sampled estimate "
          f"{e:.3f} s = {e / a:.1%} of the kernel alone (the estimate scales as rows / tokens: x{n / 32760:.2f} at 81 frames)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layer", type=int, default=LAYERS - 2, help="the guided (and skipped) layer")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_flush_denormal(True)  # random weights: denormals would make some configurations look slower
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model dim {DIM} ({DIM // 128} heads x 128), {LAYERS} layers, "
          f"ffn {FFN}; latent {FRAMES}x{HEIGHT}x{WIDTH} -> {FRAMES * HEIGHT * WIDTH // 4} tokens; 512 text tokens", flush=True)
    base = tiny_models.bench_wan(DIM, LAYERS, FFN)
    positive, negative = text_conditioning(tokens=512, seed=1), text_conditioning(tokens=512, seed=2)
    step_ratios(base, opts.rounds, opts.steps, positive, negative, opts.layer)
    registry_cost(base, positive, reps=2)
    layer_cost(reps=2)


if __name__ == "__main__":
    main()
