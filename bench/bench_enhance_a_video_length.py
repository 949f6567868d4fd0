"""Enhance-A-Video's scale across clip lengths, with and without `reference_latent_frames`.

For each model and latent frame count F, samples once with the paper's rule (weight as given) and
once with the weight given at R latent frames (weight * F / R), recording every scale the node
applies (each selected layer, step and batch element, cond and uncond) and F * CFI, which is 1 for
evenly spread temporal attention and below 1 for attention that stays on its own frame. Prints a
Markdown table of the means and, per setting, the spread of the mean scale across lengths.

Models: the demo's trained tiny Wan 2.1 (demo_models/, its own sampling settings: shift 3, uni_pc,
demo prompts) and a random tiny Wan 2.1 (support/tiny_models.py, 4 blocks of dim 256). Both run on
ComfyUI's loader and KSampler on the CPU; about 10 minutes on one thread with the defaults.

    .runtime/venv/bin/python bench/bench_enhance_a_video_length.py [--weight 4] [--reference 21]
        [--frames 5,9,13,21,31] [--seeds 2] [--threads 1]
"""

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
# The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
sys.path.append(str(ROOT))


class ScaleRecorder:
    """Wraps the method's scale function: keeps every scale it returns and F * CFI of the same q, k."""

    def __init__(self, method_module, cfi_module):
        self.method, self.cfi, self.original = method_module, cfi_module, method_module.enhance_scale
        self.scales, self.spread = [], []

    def __call__(self, q, k, frames, weight, chunk_bytes=None):
        scale = self.original(q, k, frames, weight, chunk_bytes)
        self.scales += scale.tolist()
        self.spread += (frames * self.cfi.temporal_off_diagonal_mean(q, k, frames, chunk_bytes)).tolist()
        return scale

    def __enter__(self):
        self.method.enhance_scale = self
        return self

    def __exit__(self, *exc):
        self.method.enhance_scale = self.original


def demo_model():
    """The demo's trained model with its sampling settings: (model, sample(model, frames, seed))."""
    import comfy.sd
    import nodes
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    import demo_clips
    import train_demo_models
    model = comfy.sd.load_diffusion_model(str(ROOT / "demo_models" / "freevideo_demo_wan21_t2v.safetensors"))
    model = ModelSamplingSD3().patch(model, train_demo_models.SIGMA_SHIFT)[0]
    prompts = [("red", "circle", "right"), ("blue", "square", "left"), ("green", "triangle", "down"),
               ("yellow", "circle", "up")]

    def sample(patched, frames, seed):
        pos = [[demo_clips.text_embedding(*prompts[seed % len(prompts)]), {}]]
        neg = [[demo_clips.text_embedding(), {}]]
        latent = {"samples": torch.zeros(1, 16, frames, 8, 8)}  # 64x64 through the Wan 2.1 VAE
        nodes.KSampler().sample(patched, seed, 20, 5.0, "uni_pc", "simple", pos, neg, latent, denoise=1.0)
    return model, sample


def random_model():
    """The tests' random tiny Wan 2.1: (model, sample(model, frames, seed))."""
    from support import tiny_models
    from support.sampling import ksample, text_conditioning, video_latent
    model = tiny_models.load_diffusion_model(tiny_models.wan21_t2v())

    def sample(patched, frames, seed):
        ksample(patched, video_latent(frames=frames), text_conditioning(seed=2 * seed + 1),
                text_conditioning(seed=2 * seed + 2), steps=8, cfg=5.0, seed=seed)
    return model, sample


def measure(model, sample, frames: list[int], seeds: int, weight: float, reference: int) -> list[dict]:
    from freevideo.enhance_core.measures import cross_frame_intensity
    from freevideo.enhance_core.methods import enhance_a_video
    rows = []
    for f in frames:
        row = {"frames": f}
        for name, ref in (("paper", 0), ("length", reference)):
            patched = enhance_a_video.apply_enhance_a_video(model, weight, reference_latent_frames=ref)
            with ScaleRecorder(enhance_a_video, cross_frame_intensity) as rec:
                for seed in range(seeds):
                    sample(patched, f, seed)
            row[name] = statistics.fmean(rec.scales)
            row[name + "_spread"] = statistics.fmean(rec.spread)
        rows.append(row)
        print(f"  F={f}: paper {row['paper']:.4f}, per length {row['length']:.4f}", file=sys.stderr, flush=True)
    return rows


def spread(values: list[float]) -> str:
    """Range of the mean scales, and the ratio of their largest to smallest lift above 1."""
    lifts = [v - 1 for v in values]
    ratio = f"{max(lifts) / min(lifts):.2f}x" if min(lifts) > 0 else "n/a (a mean scale of 1)"
    return f"range {max(values) - min(values):.4f}, largest / smallest lift {ratio}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", type=float, default=4.0)
    parser.add_argument("--reference", type=int, default=21, help="reference_latent_frames for the per-length rows")
    parser.add_argument("--frames", default="5,9,13,21,31", help="latent frame counts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    from support import in_process
    in_process.setup()
    import comfy.utils
    import torch
    torch.set_num_threads(a.threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    frames = [int(f) for f in a.frames.split(",")]
    print(f"weight {a.weight}; per-length rows: reference_latent_frames {a.reference}; {a.seeds} seeds per cell; "
          "every layer, every step, cond and uncond")
    print()
    print("| model | latent frames (Wan video frames) | F x CFI | mean scale, paper | mean scale, per length |")
    print("|---|---|---|---|---|")
    summary = []
    for label, build in (("demo (trained)", demo_model), ("random tiny Wan", random_model)):
        model, sample = build()
        rows = measure(model, sample, frames, a.seeds, a.weight, a.reference)
        for r in rows:
            print(f"| {label} | {r['frames']} ({4 * (r['frames'] - 1) + 1}) | {r['paper_spread']:.3f} | "
                  f"{r['paper']:.4f} | {r['length']:.4f} |")
        summary.append((label, [r["paper"] for r in rows], [r["length"] for r in rows]))
    print()
    for label, paper, length in summary:
        print(f"{label}: paper {spread(paper)}; per length {spread(length)}")


if __name__ == "__main__":
    main()
