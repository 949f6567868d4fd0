"""IE-Adapt editing inside a noise mask on the demo's trained models: a rendered "real" clip is
recoloured (the next palette colour) with and without a mask over the cells the shape travels
through, and the figure docs/images/masked_editing.png shows, at frames 0, 4, 8, 12, 16 (latent frames
0-4): the source (its VAE round trip), the mask, the unmasked and the masked edit, |masked edit - source|
decoded (x4) and in the latent (per cell, max over channels, x0.5). Prints what it measured.

Usage: python scripts/masked_editing_figure.py [--seed N] [--out PATH]
"""

import argparse
from pathlib import Path

import demo  # sets up ComfyUI in process, as the demo does
import demo_clips
import demo_metrics
import torch

EDIT_RATIO = 0.5
LABELS = ("red", "circle", "right")
BLOCK = 8  # pixels per latent cell of the Wan 2.1 VAE: a mask on whole cells is 0 or 1 in the latent


def band_mask(clip: torch.Tensor) -> torch.Tensor:
    """1 over the latent cells the shape covers in any frame, 0 elsewhere; [1, H, W] pixels."""
    seen = demo_metrics.object_mask(clip).any(0).float()[None, None]
    cells = torch.nn.functional.max_pool2d(seen, BLOCK)  # 1 where a cell holds any of the shape
    return torch.nn.functional.interpolate(cells, scale_factor=BLOCK, mode="nearest")[0]


def latent_heat(diff: torch.Tensor, scale: int) -> torch.Tensor:
    """|diff| per latent cell (max over channels), grey, upscaled to pixels, one image per latent frame
    placed at frames 0, 4, 8, ... (the Wan 2.1 VAE: latent frame j covers frames 4j-3 to 4j)."""
    cells = (diff[0].abs().amax(0) * 0.5).clamp(0, 1)  # [T, h, w]
    pixels = torch.nn.functional.interpolate(cells[:, None], scale_factor=scale, mode="nearest")[:, 0]
    frames = torch.zeros(4 * (cells.shape[0] - 1) + 1, *pixels.shape[1:], 3)
    frames[::4] = pixels[..., None]
    return frames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=demo.ROOT / "docs" / "images" / "masked_editing.png")
    args = parser.parse_args(argv)
    import nodes
    from freevideo.enhance_core.methods.entropy_editing import apply_entropy_editing

    model, vae = demo.load_models()
    ((clip, latent),) = demo.rendered_clips(vae, [args.seed], [LABELS])
    latent = latent.detach()
    mask = band_mask(clip)
    target = demo.recoloured(LABELS)
    edited_model = apply_entropy_editing(model, demo.conditioning(LABELS), {"samples": latent}, EDIT_RATIO)

    def edit(latent_in):
        (out,) = nodes.KSampler().sample(edited_model, args.seed, demo.STEPS, demo.CFG, "euler", demo.SCHEDULER,
                                         demo.conditioning(target), demo.conditioning(), latent_in, denoise=1.0)
        return out["samples"].detach()
    unmasked = edit({"samples": latent})
    masked = edit(nodes.SetLatentNoiseMask().set_mask({"samples": latent}, mask)[0])

    keep = torch.nn.functional.max_pool2d(mask[None], BLOCK)[0, 0] == 0  # latent cells outside the mask
    gap = float((masked - latent)[..., keep].abs().max())
    print(f"latent outside the mask: max |masked edit - source| {gap:.3g} (latent peak {float(latent.abs().max()):.3g}); "
          f"unmasked edit {float((unmasked - latent)[..., keep].abs().max()):.3g}")
    source = demo.decode(vae, latent)[0]  # the VAE's round trip: what an unchanged latent decodes to
    videos = {"source": source, "unmasked edit": demo.decode(vae, unmasked)[0], "masked edit": demo.decode(vae, masked)[0]}
    outside = mask[0] == 0
    for name in ("unmasked edit", "masked edit"):
        found = demo_metrics.detect(videos[name])
        change = float((videos[name] - source).abs().mean(-1)[:, outside].mean()) * 255
        print(f"{name}: colour seen {found['colour']} (target {target[0]}), mean |change| outside the mask "
              f"{change:.2f}/255 (decoded: the VAE's reach crosses the mask's edge)")
    picks = list(range(0, source.shape[0], 4))
    shown = [("source", source), ("mask", mask[0][None, :, :, None].expand(source.shape[0], -1, -1, 3)),
             ("unmasked", videos["unmasked edit"]), ("masked", videos["masked edit"]),
             ("|diff| x4", ((videos["masked edit"] - source).abs() * 4).clamp(0, 1)),
             ("latent x0.5", latent_heat(masked - latent, source.shape[1] // latent.shape[-2]))]
    rows = [[demo.to_uint8(video[picks], 2)[j] for j in range(len(picks))] for _, video in shown]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    demo.write_png(args.out, demo.grid(rows), [name for name, _ in shown], row_height=128 + 4)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
