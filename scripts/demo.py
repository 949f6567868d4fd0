"""The demo: every node of the pack on two tiny video models trained here (demo_models/, see
scripts/train_demo_models.py), with each node's effect measured.

1. ComfyUI's own server runs workflows/wan21_t2v_enhance_a_video.json (the file users drag in),
   pointed at the trained models: the text encoder becomes the test conditioning node (one per
   prompt label, concatenated), the size 64x64x17, fewer steps. It writes the enhanced video and a
   plain | enhanced side-by-side video under output/comfy/video/.
2. In this process, through the nodes' own classes and ComfyUI's KSampler, each node and setting
   samples the same 8 seeds (8 prompts, one per seed) as the plain model, and the demo writes, per
   node, output/demo/<node>/side_by_side.mp4 (top: plain, bottom: patched, first 4 seeds),
   output/demo/<node>/frames.png (frames 0, 4, 8, 12, 16 of seeds 0 and 1), and output/demo/report.md
   (+ report.json): scripts/demo_metrics.py's metrics, plain vs patched, mean and standard deviation
   over the seeds, the paired difference and its standard error.

3. IE-Adapt editing recolours each seed's video (a generated source and a rendered "real" clip) and
   is compared with the target prompt sampled plainly from the same seed (output/demo/entropy_editing*/).

Options: --seeds N (default 8), --skip-server, --out DIR, --models DIR, --threads N (default 1).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
# The root, for `support`; appended: its nodes/ must not shadow ComfyUI's nodes.py.
sys.path.append(str(ROOT))
from support import in_process  # noqa: E402

in_process.setup()

import torch  # noqa: E402

import demo_clips  # noqa: E402
import demo_metrics  # noqa: E402
import train_demo_models  # noqa: E402

MODELS = ROOT / "demo_models"
UNET = MODELS / "freevideo_demo_wan21_t2v.safetensors"
VAE = MODELS / "freevideo_demo_wan21_vae.safetensors"


def use_models(folder: Path):
    global UNET, VAE
    UNET, VAE = folder / UNET.name, folder / VAE.name
WORKFLOW = ROOT / "workflows" / "wan21_t2v_enhance_a_video.json"
OUTPUT = ROOT / "output"

# Sampling settings of the plain model, shared by every node (not tuned per node).
STEPS, CFG, SAMPLER, SCHEDULER = 20, 5.0, "uni_pc", "simple"
SHIFT = train_demo_models.SIGMA_SHIFT  # the shift the DiT was trained for
LATENT_SHAPE = (1, 16, 5, 8, 8)  # 17 frames of 64x64 through the Wan 2.1 VAE
PROMPTS = [("red", "circle", "right"), ("blue", "square", "left"), ("green", "triangle", "down"),
           ("yellow", "circle", "up"), ("blue", "triangle", "right"), ("red", "square", "down"),
           ("yellow", "triangle", "left"), ("green", "square", "up")]
# "better" direction of each metric (None: a change, not a verdict)
BETTER = {"flicker": -1, "jitter": -1, "area_change": -1, "sharpness": None, "seen": 1, "colour_ok": 1,
          "shape_ok": 1, "direction_ok": 1}
SERVER_PROMPT = ("red", "circle", "right")


def log(msg):
    print(f"[demo] {msg}", flush=True)


# --- models and sampling --------------------------------------------------------------------------

def load_models():
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    model = comfy.sd.load_diffusion_model(str(UNET))
    model = ModelSamplingSD3().patch(model, SHIFT)[0]
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(VAE)))
    return model, vae


def conditioning(labels=("", "", "")):
    return [[demo_clips.text_embedding(*labels), {}]]


def empty_latent():
    return {"samples": torch.zeros(LATENT_SHAPE)}


def sample(model, seed, labels, sampler=SAMPLER):
    import nodes
    (out,) = nodes.KSampler().sample(model, seed, STEPS, CFG, sampler, SCHEDULER, conditioning(labels), conditioning(),
                                     empty_latent(), denoise=1.0)
    return out["samples"]


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """[n, 16, 5, 8, 8] -> [n, 17, 64, 64, 3]."""
    frames = vae.decode(latents)
    return frames.reshape(latents.shape[0], -1, *frames.shape[-3:]).float()


# --- the nodes ------------------------------------------------------------------------------------

def node_classes() -> dict:
    import freevideo.nodes as pack_nodes
    return {cls.define_schema().node_id: cls for cls in pack_nodes.NODES}


def patched_sampler(node, *args):
    """A sampler for a node that patches the model: node(model, *args) -> model, then KSampler."""
    def run(model, vae, seed, labels, plain_latent):
        patched = node.execute(model, *args).result[0]
        return sample(patched, seed, labels)
    return run


def evs_sampler(node):
    """EVS refining the plain sample: the same trained model is the image model, frame by frame (each
    frame a one-frame latent through the same VAE) and the video model of the [T2V] block."""
    def run(model, vae, seed, labels, plain_latent):
        pos, neg = conditioning(labels), conditioning()
        out = node.execute({"samples": plain_latent}, model, pos, neg, model, pos, neg, seed=seed, image_steps=20,
                           image_cfg=CFG, image_sampler="euler", image_scheduler="simple", strength=0.4, t_T2V=4,
                           video_steps=8, video_cfg=CFG, video_sampler="euler", video_scheduler="simple", t_V=4,
                           n_V=4, sfi=False, sfi_gamma=0.8, sfi_layers="all", image_vae=vae, video_vae=vae)
        return out.result[0]["samples"]
    return run


def methods(classes: dict) -> list[tuple[str, str, str, object]]:
    """(slug, title, setting, sampler) for every node and setting in the demo."""
    out = []
    if "FreeVideoEnhanceAVideo" in classes:
        node = classes["FreeVideoEnhanceAVideo"]
        out.append(("enhance_a_video", "Enhance-A-Video", "weight 4 (default), all layers", patched_sampler(node, 4.0, 0.0, 1.0, "all")))
        out.append(("enhance_a_video_w16", "Enhance-A-Video", "weight 16, all layers", patched_sampler(node, 16.0, 0.0, 1.0, "all")))
    if "FreeVideoEntropyGuidance" in classes:
        node = classes["FreeVideoEntropyGuidance"]
        out.append(("entropy_guidance", "IE-Adapt Entropy Guidance", "scale 1, uniform / identity, auto top 1 (defaults)",
                    patched_sampler(node, 1.0, "uniform", "identity", "auto", 1, 0, 0.0, 1.0, "video tokens")))
    if "FreeVideoFeatureAccumulation" in classes:
        node = classes["FreeVideoFeatureAccumulation"]
        from freevideo.enhance_core.methods.feature_accumulation import DEFAULT_GATE, DEFAULT_GROUP_SIZE, MODES
        out.append(("feature_accumulation", "Feature Accumulation (RepVideo)",
                    f"gate {DEFAULT_GATE}, groups of {DEFAULT_GROUP_SIZE}, {MODES[0]} (defaults)",
                    patched_sampler(node, DEFAULT_GATE, DEFAULT_GROUP_SIZE, MODES[0], "all", 0.0, 1.0)))
    if "FreeVideoEVSSampler" in classes:
        out.append(("evs", "EVS Sampler", "same model frame-wise as the image model, strength 0.4 of 20 image steps, "
                    "block at image step 4, video t_V = n_V = 4 of 8", evs_sampler(classes["FreeVideoEVSSampler"])))
    return out


# --- pictures and videos --------------------------------------------------------------------------

def to_uint8(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """[T, H, W, 3] in [0, 1] -> uint8, nearest-neighbour upscaled."""
    x = frames.clamp(0, 1).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


def grid(rows: list[list[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """Tiles [H, W, 3] uint8 images (or [T, H, W, 3] videos) into one, white gaps."""
    def cat(items, dim):
        parts = []
        for i, item in enumerate(items):
            if i:
                shape = list(item.shape)
                shape[dim] = gap
                parts.append(torch.full(shape, 255, dtype=torch.uint8))
            parts.append(item)
        return torch.cat(parts, dim=dim)
    video = rows[0][0].ndim == 4
    return cat([cat(row, 2 if video else 1) for row in rows], 1 if video else 0)


def write_mp4(path: Path, video: torch.Tensor, fps: int = 8):
    import av
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = video.shape[1], video.shape[2]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "16"}
    for frame in video.numpy():
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def write_png(path: Path, image: torch.Tensor, labels: list[str] | None = None, row_height: int = 0):
    from PIL import Image, ImageDraw
    img = Image.fromarray(image.numpy())
    if labels:
        margin = 70
        canvas = Image.new("RGB", (img.width + margin, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(labels):
            draw.text((4, i * row_height + row_height // 2 - 6), text, fill="black")
        img = canvas
    img.save(path)


def save_media(folder: Path, videos: list[tuple[str, torch.Tensor]]):
    """side_by_side.mp4: one row per (name, videos) entry (plain on top), first 4 seeds; frames.png:
    frames 0, 4, 8, 12, 16 of seeds 0 and 1, one row per entry."""
    folder.mkdir(parents=True, exist_ok=True)
    n = min(4, len(videos[0][1]))
    write_mp4(folder / "side_by_side.mp4", grid([[to_uint8(video[i], 3) for i in range(n)] for _, video in videos]))
    picks = list(range(0, videos[0][1].shape[1], 4))
    rows, labels = [], []
    for i in range(min(2, len(videos[0][1]))):
        for name, video in videos:
            rows.append([to_uint8(video[i][picks], 2)[j] for j in range(len(picks))])
            labels.append(f"{name} s{i}")
    write_png(folder / "frames.png", grid(rows), labels, row_height=128 + 4)


# --- IE-Adapt editing -----------------------------------------------------------------------------

EDIT_RATIO = 0.5  # the paper's


def rendered_clips(vae, seeds, prompts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The demo's "real videos": per seed a rendered clip (demo_clips), [T, H, W, 3], and its VAE latent
    (encoded once: the VAE ceiling and the editing demo both use it)."""
    clips = [demo_clips.render_clip(*lab, seed=10_000 + s)["video"].permute(1, 2, 3, 0) for s, lab in zip(seeds, prompts)]
    return [(clip, vae.encode(clip)) for clip in clips]


def recoloured(labels):
    """The editing target: the next palette colour, same shape and direction."""
    names = list(demo_clips.COLOURS)
    return (names[(names.index(labels[0]) + 1) % len(names)],) + tuple(labels[1:])


def editing_demo(node, model, vae, seeds, prompts, real, out) -> list[dict]:
    """Recolour each seed's video with IE-Adapt editing (euler: the sampler a generated source follows
    exactly), from a generated source (the seed's plain euler sample) and from a "real" video (a
    rendered clip, VAE-encoded, DDIM-inverted by the node). The baseline is the target prompt sampled
    plainly from the same seed. Measured: whether the target colour is seen, and how far the shape's
    track is from the source's (layout and motion kept)."""
    results = []
    for kind in ("generated", "real video"):
        t0 = time.time()
        sources, plains, edits = [], [], []
        for s, lab, (clip, clip_latent) in zip(seeds, prompts, real):
            if kind == "generated":
                latent = None
                sources.append(decode(vae, sample(model, s, lab, "euler"))[0])
            else:
                latent = {"samples": clip_latent}
                sources.append(clip)
            target = recoloured(lab)
            plains.append(decode(vae, sample(model, s, target, "euler"))[0])
            edited_model = node.execute(model, conditioning(lab), EDIT_RATIO, 0.0, 1.0, latent).result[0]
            edits.append(decode(vae, sample(edited_model, s, target, "euler"))[0])
        sources, plains, edits = torch.stack(sources), torch.stack(plains), torch.stack(edits)
        row = {"kind": kind, "seconds": time.time() - t0}
        source_tracks = [demo_metrics.detect(v)["centres"] for v in sources]
        for name, videos in (("plain", plains), ("edited", edits)):
            found = [demo_metrics.detect(v) for v in videos]
            colour = [float(f["colour"] == recoloured(lab)[0]) for f, lab in zip(found, prompts)]
            track = [demo_metrics.track_distance(f["centres"], src) for f, src in zip(found, source_tracks)]
            row[name] = {"target_colour": colour, "track_distance": track}
        slug = "entropy_editing" if kind == "generated" else "entropy_editing_real"
        save_media(out / slug, [("source", sources), ("plain", plains), ("edited", edits)])
        results.append(row)
        log(f"IE-Adapt editing ({kind} source): {row['seconds']:.1f} s; " + editing_line(row))
    return results


def editing_line(row) -> str:
    parts = []
    for name in ("plain", "edited"):
        colour = row[name]["target_colour"]
        track = torch.tensor([t for t in row[name]["track_distance"] if t == t], dtype=torch.float64)
        spread = f" ± {track.std().item():.1f}" if len(track) > 1 else ""
        parts.append(f"{name}: target colour {sum(colour):.0f}/{len(colour)}, track distance to the source "
                     f"{track.mean().item():.1f}{spread} px (n {len(track)})")
    return "; ".join(parts)


# --- report ---------------------------------------------------------------------------------------

def compare(plain_rows: list[dict], patched_rows: list[dict]) -> dict:
    out = {}
    for key in demo_metrics.NUMERIC:
        pairs = [(a[key], b[key]) for a, b in zip(plain_rows, patched_rows)
                 if key in a and key in b and a[key] == a[key] and b[key] == b[key]]
        if not pairs:
            continue
        a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        d = b - a
        se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[key] = {"plain": (a.mean().item(), a.std().item()), "patched": (b.mean().item(), b.std().item()),
                    "diff": d.mean().item(), "se": se, "n": len(d)}
    return out


def verdict(stats: dict) -> str:
    """Changes beyond 2 standard errors of the paired difference and 2% of the plain mean; detection
    rates: a change of at least one video beyond 2 standard errors."""
    notes = []
    for key, s in stats.items():
        rate = key.endswith("_ok") or key == "seen"
        if rate:
            significant = abs(s["diff"]) >= 1 / s["n"] and (abs(s["diff"]) > 2 * s["se"] or s["se"] == 0)
        else:  # beyond 2 standard errors and at least 2% of the plain mean
            significant = abs(s["diff"]) > 2 * s["se"] and abs(s["diff"]) > 0.02 * abs(s["plain"][0])
        if not significant:
            continue
        better = BETTER[key]
        word = "changed" if better is None else ("better" if s["diff"] * better > 0 else "worse")
        notes.append(f"{key} {s['diff']:+.3g} ({word})")
    return "; ".join(notes) if notes else "no change beyond 2 standard errors on any metric"


def fmt(mean_std):
    return f"{mean_std[0]:.3f} ± {mean_std[1]:.3f}"


def report_markdown(plain_summary, ceiling_summary, results, editing, inspector_table, seeds, timings) -> str:
    lines = ["# FreeVideo demo report", "",
             f"Trained tiny Wan 2.1 models (demo_models/), 64x64, 17 frames; {STEPS} steps {SAMPLER}/{SCHEDULER}, "
             f"CFG {CFG}, shift {SHIFT}; {seeds} seeds, prompt i for seed i (colour shape direction). "
             "Mean ± std over seeds; diff = patched - plain, paired by seed, ± its standard error. "
             "Lower is better for flicker (1/255 per pixel on the background), jitter (px/frame²) and area_change; "
             "sharpness is high-frequency energy (higher = more detail or more noise); *_ok are detection rates.", ""]
    lines += ["## Plain model", "",
              "The second column is the ceiling: rendered clips of the same prompts through the VAE alone (what a "
              "perfect DiT would give through this VAE).", "",
              "| metric | plain | rendered clips through the VAE |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v[:2])} | {fmt(ceiling_summary[k][:2]) if k in ceiling_summary else '-'} |"
              for k, v in plain_summary.items()]
    for slug, title, setting, stats, seconds in results:
        lines += ["", f"## {title}: {setting}", "", f"Media: `output/demo/{slug}/side_by_side.mp4`, "
                  f"`output/demo/{slug}/frames.png`; {seconds:.1f} s for {seeds} samples.", "",
                  "| metric | plain | patched | diff ± se |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(s['plain'])} | {fmt(s['patched'])} | {s['diff']:+.3f} ± {s['se']:.3f} |" for k, s in stats.items()]
        lines += ["", f"Verdict: {verdict(stats)}."]
    if editing:
        lines += ["", f"## IE-Adapt Video Editing: ratio {EDIT_RATIO}, recolour (the next palette colour, same shape and "
                  "direction), euler", "",
                  "Rows per seed in `output/demo/entropy_editing*/frames.png`: source, the target prompt sampled plainly "
                  "from the same seed, edited.", ""]
        lines += [f"- {row['kind']} source ({row['seconds']:.1f} s): {editing_line(row)}" for row in editing]
    if inspector_table:
        lines += ["", "## Attention Inspector", "", "Chart: `output/demo/attention_inspector/chart.png`.", "",
                  "```", inspector_table.strip(), "```"]
    lines += ["", "## Timings", ""] + [f"- {k}: {v:.1f} s" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


# --- the server run -------------------------------------------------------------------------------

def server_prompt(prompt: dict) -> dict:
    """Point the workflow at the trained models: each CLIPTextEncode becomes three test conditioning
    nodes (colour, shape, direction) joined by ConditioningConcat; small size and step count."""
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = UNET.name
        elif kind == "VAELoader":
            inputs["vae_name"] = VAE.name
        elif kind == "CLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            positive = "fox" in inputs["text"]  # the workflow's positive prompt; the other is the negative
            labels = SERVER_PROMPT if positive else ("", "", "")
            for i, label in enumerate(labels):
                prompt[f"{node_id}_{i}"] = {"class_type": "FreeVideoTestTextConditioning",
                                            "inputs": {"text": label, "tokens": demo_clips.LABEL_TOKENS, "dim": demo_clips.TEXT_DIM}}
            prompt[f"{node_id}_01"] = {"class_type": "ConditioningConcat",
                                       "inputs": {"conditioning_to": [f"{node_id}_0", 0], "conditioning_from": [f"{node_id}_1", 0]}}
            prompt[node_id] = {"class_type": "ConditioningConcat",
                               "inputs": {"conditioning_to": [f"{node_id}_01", 0], "conditioning_from": [f"{node_id}_2", 0]}}
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=64, height=64, length=17)
        elif kind == "ModelSamplingSD3":
            inputs["shift"] = SHIFT
        elif kind == "KSampler":
            inputs.update(steps=STEPS, cfg=CFG)
    return prompt


def run_server():
    from support.comfy_server import ComfyServer
    from workflow_api import to_api
    base = ROOT / ".runtime" / "demo"
    shutil.rmtree(base, ignore_errors=True)
    with ComfyServer(base, models={"diffusion_models": [UNET], "vae": [VAE]}, output_dir=OUTPUT / "comfy") as server:
        prompt = server_prompt(to_api(json.loads(WORKFLOW.read_text()), server.get("/object_info")))
        entry = server.run(prompt, timeout=600)
        files = server.output_files(entry)
    for f in files:
        log(f"wrote {f.relative_to(ROOT)} ({f.stat().st_size} bytes)")
    if not any("side_by_side" in f.name for f in files):
        raise SystemExit("[demo] the side-by-side video is missing")


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="FreeVideo demo on the trained tiny models")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--skip-server", action="store_true", help="only the in-process part")
    p.add_argument("--out", type=Path, default=OUTPUT / "demo")
    p.add_argument("--models", type=Path, default=MODELS, help="folder with the two trained model files")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: with tiny models more threads mostly wait on each other, "
                        "and on a busy machine they spin)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_models(args.models)
    started = time.time()
    timings = {}
    if not args.skip_server:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch
        t0 = time.time()
        run_server()
        timings["server run of the workflow"] = time.time() - t0
        log(f"ran {WORKFLOW.relative_to(ROOT)} through ComfyUI's server in {timings['server run of the workflow']:.0f} s")

    torch.manual_seed(0)
    model, vae = load_models()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seeds = list(range(args.seeds))
    prompts = [PROMPTS[s % len(PROMPTS)] for s in seeds]

    t0 = time.time()
    plain_latents = torch.cat([sample(model, s, lab) for s, lab in zip(seeds, prompts)])
    plain = decode(vae, plain_latents)
    plain_rows = [demo_metrics.video_metrics(v, lab) for v, lab in zip(plain, prompts)]
    timings["plain samples"] = time.time() - t0
    plain_summary = demo_metrics.summarise(plain_rows)
    real = rendered_clips(vae, seeds, prompts)
    ceiling_summary = demo_metrics.summarise([demo_metrics.video_metrics(decode(vae, latent)[0], lab)
                                              for (_, latent), lab in zip(real, prompts)])
    log(f"plain: {len(seeds)} samples in {timings['plain samples']:.1f} s; detected "
        + ", ".join(" ".join(str(x) for x in r["detected"]) for r in plain_rows))

    classes = node_classes()
    results, saved = [], {}
    for slug, title, setting, run in methods(classes):
        t0 = time.time()
        latents = torch.cat([run(model, vae, s, lab, plain_latents[i:i + 1]) for i, (s, lab) in enumerate(zip(seeds, prompts))])
        patched = decode(vae, latents)
        rows = [demo_metrics.video_metrics(v, lab) for v, lab in zip(patched, prompts)]
        seconds = time.time() - t0
        timings[slug] = seconds
        stats = compare(plain_rows, rows)
        results.append((slug, title, setting, stats, seconds))
        save_media(out / slug, [("plain", plain), ("patched", patched)])
        saved[slug] = {"title": title, "setting": setting, "stats": stats, "seconds": seconds,
                       "detected": [r["detected"] for r in rows]}
        log(f"{title} ({setting}): {seconds:.1f} s; {verdict(stats)}")

    editing = []
    if "FreeVideoEntropyEditing" in classes:
        t0 = time.time()
        editing = editing_demo(classes["FreeVideoEntropyEditing"], model, vae, seeds, prompts, real, out)
        timings["entropy editing"] = time.time() - t0

    inspector_table = None
    if "FreeVideoAttentionInspector" in classes:
        t0 = time.time()
        chart, inspector_table = classes["FreeVideoAttentionInspector"].execute(
            model, empty_latent(), conditioning(PROMPTS[0]), 1.0, 0, 1, 0, "video tokens").result[:2]
        (out / "attention_inspector").mkdir()
        write_png(out / "attention_inspector" / "chart.png", (chart[0].clamp(0, 1) * 255).round().to(torch.uint8))
        timings["attention inspector"] = time.time() - t0
        log(f"attention inspector: chart in {timings['attention inspector']:.1f} s")

    timings["total"] = time.time() - started
    (out / "report.md").write_text(report_markdown(plain_summary, ceiling_summary, results, editing, inspector_table, len(seeds), timings))
    (out / "report.json").write_text(json.dumps({"settings": {"steps": STEPS, "cfg": CFG, "sampler": SAMPLER,
                                                              "scheduler": SCHEDULER, "shift": SHIFT, "seeds": seeds,
                                                              "prompts": prompts},
                                                 "plain": plain_summary, "rendered_through_vae": ceiling_summary,
                                                 "plain_detected": [r["detected"] for r in plain_rows],
                                                 "methods": saved, "editing": editing, "timings": timings}, indent=1) + "\n")
    log(f"report: {out / 'report.md'}; total {timings['total']:.0f} s")


if __name__ == "__main__":
    main()
