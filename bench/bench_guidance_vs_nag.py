"""IE-Adapt guidance and Normalized Attention Guidance (NAG) side by side at CFG 1, the setting of
distilled Wan models (a step-distill LoRA, 4 steps): cost per step and effect, in one run on CPU,
ComfyUI with SDPA attention (as on GPUs).

Configurations, each sampling 4 euler steps at CFG 1 from the same noise:
- plain: ComfyUI skips the unconditional pass at CFG 1, one batch element per step;
- ours U/I, ours A/I: FreeVideoEntropyGuidance as the distilled workflow sets it (scale 1, layers
  auto, entropy_rows 512), the uniform/identity and original/identity pairs; and uniform/identity
  with the layer auto registered given as a fixed list (what the Attention Inspector's layer list
  output gives): the registry then needs no call of its own;
- ComfyUI NAG: core `NAGuidance` (comfy_extras/nodes_nag.py, defaults 5 / 0.5 / 1.5), where the
  running ComfyUI has it (0.33 has, 0.3.75 has not). It turns ComfyUI's CFG-1 shortcut off, so the
  negative prompt runs every step, and patches `attn1_output_patch`; the script counts the calls of
  that patch, since which models call it decides whether NAG acts;
- KJNodes NAG: `WanVideoNAG` of ComfyUI-KJNodes (defaults 11 / 0.25 / 2.5, the negative prompt as its
  conditioning), loaded from the pack's snapshot in FREEVIDEO_PEERS (default ../shared/peers) when
  it is there: the NAG Wan users of native ComfyUI graphs install.

Cost per step = wall time of a whole sampling run / steps (the registry's measurement included, as a
user pays it), wall time and the process's CPU time (steadier where other jobs share the machine),
median over interleaved rounds in alternating order; ratio = that / plain's. Effect =
relative difference of the sampled latent from plain's (norm of the difference / norm of plain).

Model: Wan 2.1 layout with head dim 128, 6 layers of width 256 (the model of
bench_entropy_guidance.py); latent 2 x 30 x 52 (780 tokens), 512 text tokens.

    source .runtime/env.sh && $FREEVIDEO_PYTHON bench/bench_guidance_vs_nag.py [--rounds 5] [--threads 1]
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
sys.path.append(str(ROOT))
from support import in_process  # noqa: E402

in_process.setup()

import torch  # noqa: E402

import comfy.sample  # noqa: E402
from freevideo.enhance_core.methods.entropy_guidance import EntropyGuidance  # noqa: E402
from support import tiny_models  # noqa: E402
from support.sampling import counting_model_calls, text_conditioning  # noqa: E402

DIM, LAYERS, FFN = 256, 6, 1024
FRAMES, HEIGHT, WIDTH = 2, 30, 52
STEPS = 4
PEERS = Path(os.environ.get("FREEVIDEO_PEERS", ROOT.parent / "shared" / "peers"))


def sample(model, positive, negative):
    """(wall seconds of the whole run, CPU seconds of the whole run, CPU seconds of each step, sampled latent)."""
    latent = torch.zeros(1, 16, FRAMES, HEIGHT, WIDTH)
    noise = comfy.sample.prepare_noise(latent, 0)
    wall, stamps = time.perf_counter(), [time.process_time()]
    out = comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", positive, negative, latent,
                              callback=lambda *a: stamps.append(time.process_time()), disable_pbar=True, seed=0)
    return time.perf_counter() - wall, stamps[-1] - stamps[0], [b - a for a, b in zip(stamps, stamps[1:])], out


def core_nag(base):
    """ComfyUI's NAGuidance with its defaults and a counter on its attention patch, or (None, why)."""
    try:
        from comfy_extras.nodes_nag import NAGuidance
    except ImportError:
        return None, "this ComfyUI has no comfy_extras/nodes_nag.py (core NAG came after 0.3.75)"
    m = NAGuidance.execute(base, 5.0, 0.5, 1.5).result[0]
    patches = m.model_options["transformer_options"]["patches"]
    count = [0]

    def counted(patch):
        def call(*args, **kwargs):
            count[0] += 1
            return patch(*args, **kwargs)
        return call
    patches["attn1_output_patch"] = [counted(p) for p in patches["attn1_output_patch"]]
    m.nag_patch_calls = count
    return m, None


def kjnodes_nag(base, negative, folder):
    """KJNodes' WanVideoNAG with its defaults, or (None, why). Its module is loaded from the
    snapshot by file (it imports only ComfyUI and the standard library)."""
    found = sorted(PEERS.glob("ComfyUI-KJNodes-*.tar.gz"))
    if not found:
        return None, f"no ComfyUI-KJNodes-*.tar.gz in {PEERS}"
    with tarfile.open(found[-1]) as tf:
        member = tf.getmember("ComfyUI-KJNodes/nodes/model_optimization_nodes.py")
        tf.extractall(folder, members=[member], filter="data")
    spec = importlib.util.spec_from_file_location("kjnodes_model_optimization", Path(folder) / member.name)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a snapshot that needs what this runtime lacks: skip it, say why
        return None, f"{found[-1].name} does not import here: {e!r}"
    return module.WanVideoNAG().patch(base, negative, 11.0, 0.25, 2.5)[0], found[-1].name


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time then measures the work)")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)  # random weights: denormals would make some configurations look slower
    import comfy.model_management
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    print(f"ComfyUI {version} ({in_process.COMFY}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {comfy.model_management.get_torch_device()}; model dim {DIM} ({DIM // 128} heads x 128), {LAYERS} layers, "
          f"ffn {FFN}; latent {FRAMES}x{HEIGHT}x{WIDTH} -> {FRAMES * HEIGHT * WIDTH // 4} tokens; 512 text tokens; "
          f"{STEPS} steps euler, CFG 1", flush=True)
    base = tiny_models.bench_wan(DIM, LAYERS, FFN)
    positive, negative = text_conditioning(tokens=512, seed=1), text_conditioning(tokens=512, seed=2)

    configs, guidance, skipped = {"plain": base}, {}, {}
    for name, pair in (("ours U/I", ("uniform", "identity")), ("ours A/I", ("original", "identity"))):
        m = base.clone()
        guidance[name] = EntropyGuidance(m, 1.0, *pair, layers="auto", top_k=1, entropy_rows=512)
        configs[name] = m
    nag, why = core_nag(base)
    if nag is None:
        skipped["ComfyUI NAG"] = why
    else:
        configs["ComfyUI NAG"] = nag
    with tempfile.TemporaryDirectory() as folder:
        kj, why = kjnodes_nag(base, negative, folder)
    if kj is None:
        skipped["KJNodes NAG"] = why
    else:
        configs["KJNodes NAG"] = kj
        print(f"KJNodes: WanVideoNAG from {why}")

    counted = {name: counting_model_calls(m) for name, m in configs.items()}
    names = list(configs)
    latents, elements = {}, {}
    for name in names:  # warm-up: model loading, first-call costs
        sample(counted[name][0], positive, negative)
    # The layer auto registered, given as a fixed list (the Attention Inspector's layer list): the
    # first step then needs no separate registry call and its branches share the prefix too.
    fixed = ",".join(str(layer) for layer in guidance["ours U/I"].last_run.registered)
    name = f"ours U/I {fixed}"
    m = base.clone()
    guidance[name] = EntropyGuidance(m, 1.0, "uniform", "identity", layers=fixed, entropy_rows=512)
    counted[name] = counting_model_calls(m)
    names.insert(names.index("ours U/I") + 1, name)
    sample(counted[name][0], positive, negative)
    wall, cpu, later = ({name: [] for name in names} for _ in range(3))
    if "ComfyUI NAG" in configs:
        configs["ComfyUI NAG"].nag_patch_calls[0] = 0
    for r in range(opts.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            model, calls = counted[name]
            calls.clear()
            seconds, cpu_seconds, steps, latents[name] = sample(model, positive, negative)
            wall[name].append(seconds / STEPS)
            cpu[name].append(cpu_seconds / STEPS)
            later[name] += steps[1:]
            elements[name] = (len(calls), sum(calls))
            print(f"  round {r} {name:12s} {seconds:6.2f} s wall, {cpu_seconds:6.2f} s CPU for {STEPS} steps; model call "
                  f"batch sizes {calls}", flush=True)

    med = {name: [statistics.median(d[name]) for d in (wall, cpu, later)] for name in names}
    plain_x = latents["plain"]
    print(f"\nCFG 1, {STEPS} steps, medians of {opts.rounds} rounds, each with its ratio to plain. wall = wall time of a run / "
          f"steps; CPU = the process's CPU time of a run / steps (steadier on a shared machine); both include the "
          f"registry (first step). later = CPU time of steps 2-{STEPS} alone. effect = |x - x_plain| / |x_plain| of the "
          f"sampled latent:")
    print(f"  {'config':12s} {'wall s':>7s} {'ratio':>6s} {'CPU s':>7s} {'ratio':>6s} {'later':>7s} {'ratio':>6s} "
          f"{'calls/run':>9s} {'elements/run':>12s} {'effect':>9s}")
    for name in names:
        cells = " ".join(f"{t:7.3f} {t / p:6.3f}" for t, p in zip(med[name], med["plain"]))
        effect = ((latents[name] - plain_x).norm() / plain_x.norm()).item()
        print(f"  {name:12s} {cells} {elements[name][0]:9d} {elements[name][1]:12d} {effect:9.2e}")
    for name, g in guidance.items():
        run = g.last_run
        print(f"  {name}: registered layer(s) {run.registered} of {LAYERS} (entropies "
              + ", ".join(f"{layer}: {e:.3f}" for layer, e in sorted(run.entropies.items())) + ")")
    if "ComfyUI NAG" in configs:
        n = configs["ComfyUI NAG"].nag_patch_calls[0]
        print(f"  ComfyUI NAG: its attn1_output_patch was called {n} times in {opts.rounds} runs"
              + (" (Wan's blocks never call that patch point: on Wan the node only turns the CFG-1 shortcut off)" if n == 0 else ""))
    for name, why in skipped.items():
        print(f"  {name}: skipped, {why}")


if __name__ == "__main__":
    main()
