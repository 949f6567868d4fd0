"""Metrics for the demo's videos, on the procedural world's own terms (scripts/demo_clips.py): no
learned networks, nothing downloaded.

Videos are ComfyUI IMAGE tensors: [frames, height, width, 3], values in [0, 1].

- The shape is found exactly as the renderer draws it: objects are saturated, backgrounds are not
  (saturation = max - min of RGB above SATURATED). Its colour is the nearest palette colour by
  hue, its shape comes from area / (pi * r_max^2) (1 for a disc, 2/pi for a square, 0.41 for an
  equilateral triangle), its direction from the centroid's path.
- flicker: mean |frame t - frame t-1| over background pixels (the backgrounds are static, so any
  change there is flicker), in 1/255 units;
- jitter: mean |second difference| of the shape's centroid (px / frame^2; the clips' motion is a
  constant velocity plus a small hop, so a smooth path scores low);
- area_change: the shape's area, std / mean over frames (the shapes keep their size);
- sharpness: high-frequency energy, mean squared 4-neighbour Laplacian of the grey frames x 1000;
- colour_ok, shape_ok, direction_ok: whether the detected labels match the prompt's;
- track_distance (editing): mean distance between two videos' centroid tracks over the frames where
  both show the shape (px): how closely an edit keeps its source's layout and motion.
"""

import math

import torch
import torch.nn.functional as F

from demo_clips import COLOURS, DIRECTIONS

SATURATED = 0.3
MIN_AREA = 12  # pixels; smaller blobs count as "no shape in this frame"
SHAPE_RATIO = (("circle", 0.8), ("square", 0.52), ("triangle", 0.0))  # area / (pi r_max^2) thresholds
MIN_TRAVEL = 4.0  # px between first and last centroid for a direction to count


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue angle in radians of [..., 3] colours."""
    r, g, b = rgb.unbind(-1)
    return torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)


PALETTE_HUES = {name: _hue(torch.tensor(rgb)).item() for name, rgb in COLOURS.items()}


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] float in [0, 1]."""
    video = video.float()
    if video.ndim == 5:
        raise ValueError("one video at a time: [T, H, W, 3]")
    return video.clamp(0, 1)


def object_mask(frames: torch.Tensor) -> torch.Tensor:
    frames = as_frames(frames)
    return (frames.amax(-1) - frames.amin(-1)) > SATURATED


def detect(frames: torch.Tensor) -> dict:
    """The shape in each frame: centroids [T, 2] (x, y; NaN where none), areas [T], and the
    clip's colour, shape and direction labels (None where undecidable)."""
    frames = as_frames(frames)
    mask = object_mask(frames)
    T, H, W = mask.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    centres = torch.full((T, 2), float("nan"))
    areas = mask.flatten(1).sum(1).float()
    ratios, hues = [], []
    for t in range(T):
        m = mask[t]
        if m.sum() < MIN_AREA:
            continue
        cx, cy = xx[m].mean(), yy[m].mean()
        centres[t] = torch.stack([cx, cy])
        dist = torch.sqrt((xx[m] - cx) ** 2 + (yy[m] - cy) ** 2)
        r_max = torch.quantile(dist, 0.98) + 0.5
        ratios.append((m.sum() / (math.pi * r_max ** 2)).item())
        hues.append(_hue(frames[t][m]))
    out = {"centres": centres, "areas": areas, "mask": mask, "colour": None, "shape": None, "direction": None}
    if not hues:
        return out
    hue = torch.cat(hues)
    # nearest palette hue per pixel (circular distance), majority vote
    names = list(PALETTE_HUES)
    ref = torch.tensor([PALETTE_HUES[n] for n in names])
    diff = torch.atan2(torch.sin(hue[:, None] - ref), torch.cos(hue[:, None] - ref)).abs()
    out["colour"] = names[int(torch.bincount(diff.argmin(1), minlength=len(names)).argmax())]
    ratio = sorted(ratios)[len(ratios) // 2]
    out["shape"] = next(name for name, lo in SHAPE_RATIO if ratio >= lo)
    out["shape_ratio"] = ratio
    seen = ~torch.isnan(centres[:, 0])
    if seen.sum() >= 2:
        idx = torch.nonzero(seen).flatten()
        move = centres[idx[-1]] - centres[idx[0]]
        if move.norm() >= MIN_TRAVEL:
            out["direction"] = max(DIRECTIONS, key=lambda d: float(move[0] * DIRECTIONS[d][0] + move[1] * DIRECTIONS[d][1]))
        out["travel"] = move.norm().item()
    return out


def flicker(frames: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean |frame-to-frame change| on pixels that are background in both frames, in 1/255."""
    frames = as_frames(frames)
    mask = object_mask(frames) if mask is None else mask
    grown = F.max_pool2d(mask[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0  # the shape's edge too
    background = ~(grown[1:] | grown[:-1])
    change = (frames[1:] - frames[:-1]).abs().mean(-1)
    if background.sum() == 0:
        return float("nan")
    return (change[background].mean() * 255).item()


def jitter(centres: torch.Tensor) -> float:
    """Mean |c[t+1] - 2 c[t] + c[t-1]| over frames where the shape is seen three times in a row."""
    second = (centres[2:] - 2 * centres[1:-1] + centres[:-2]).norm(dim=-1)
    second = second[~torch.isnan(second)]
    return second.mean().item() if len(second) else float("nan")


def area_change(areas: torch.Tensor) -> float:
    seen = areas[areas >= MIN_AREA]
    return (seen.std() / seen.mean()).item() if len(seen) >= 2 else float("nan")


def sharpness(frames: torch.Tensor) -> float:
    """High-frequency energy: mean squared Laplacian of the grey frames, x 1000."""
    grey = as_frames(frames).mean(-1)[:, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(grey, kernel)
    return (lap.pow(2).mean() * 1000).item()


def track_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean distance (px) between two videos' centroid tracks (detect()'s "centres"), over frames
    where both show the shape; NaN where there is no such frame."""
    d = (a - b).norm(dim=-1)
    d = d[~torch.isnan(d)]
    return d.mean().item() if len(d) else float("nan")


def video_metrics(frames: torch.Tensor, labels: tuple[str, str, str] | None = None) -> dict:
    """Every metric of one video; with the prompt's (colour, shape, direction), whether they match."""
    found = detect(frames)
    out = {
        "flicker": flicker(frames, found["mask"]),
        "jitter": jitter(found["centres"]),
        "area_change": area_change(found["areas"]),
        "sharpness": sharpness(frames),
        "seen": float((found["areas"] >= MIN_AREA).float().mean()),
        "detected": (found["colour"], found["shape"], found["direction"]),
    }
    if labels is not None:
        colour, shape, direction = labels
        out["colour_ok"] = float(found["colour"] == colour)
        out["shape_ok"] = float(found["shape"] == shape)
        out["direction_ok"] = float(found["direction"] == direction)
    return out


NUMERIC = ("flicker", "jitter", "area_change", "sharpness", "seen", "colour_ok", "shape_ok", "direction_ok")


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation over videos of each numeric metric (NaNs skipped), and n."""
    out = {}
    for key in NUMERIC:
        vals = torch.tensor([r[key] for r in rows if key in r and r[key] == r[key]], dtype=torch.float64)
        if len(vals):
            out[key] = (vals.mean().item(), vals.std().item() if len(vals) > 1 else 0.0, len(vals))
    return out
