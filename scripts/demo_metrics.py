"""Metrics for the demo's videos, on the procedural world's own terms (scripts/demo_clips.py): no
learned networks, nothing downloaded.

Videos are ComfyUI IMAGE tensors: [frames, height, width, 3], values in [0, 1].

- The shape is found exactly as the renderer draws it: objects are saturated, backgrounds are not
  (saturation = max - min of RGB above SATURATED). Its colour is the nearest palette colour by
  hue, its direction from the centroid's path, its shape from its outline's corners: the radius
  r(theta) where the saturation ends, on rays from the centroid, has a strong 3rd harmonic for a
  triangle (0.27 of the mean radius when drawn sharp), a 4th for a square (0.136), neither for a
  circle. Rotation does not change these amplitudes, and a blurred outline keeps the harmonic at a
  fraction of its sharp value, where an area ratio calls every rounded shape a circle.
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
# a shape is told by its corners when at least a quarter of its sharp outline's harmonic remains
# (ours: the VAE's round trips keep 0.10-0.14 of a triangle's 0.27, and circles show up to 0.03)
TRIANGLE_A3, SQUARE_A4 = 0.27 / 4, 0.136 / 4
RAYS = 72
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


def saturation(frames: torch.Tensor) -> torch.Tensor:
    """max - min of RGB per pixel, [T, H, W]: the shapes are saturated, the backgrounds are not."""
    frames = as_frames(frames)
    return frames.amax(-1) - frames.amin(-1)


def object_mask(frames: torch.Tensor) -> torch.Tensor:
    return saturation(frames) > SATURATED


def outline_harmonics(sat_map: torch.Tensor, cx: float, cy: float) -> tuple[float, float]:
    """Amplitudes of the 3rd and 4th harmonics of the outline radius r(theta) / mean r, from RAYS rays
    out of (cx, cy) (pixel centres at integers) on the saturation map `sat_map` [H, W], sampled every
    1/4 px."""
    H, W = sat_map.shape
    theta = torch.arange(RAYS) * (2 * math.pi / RAYS)
    radii = torch.arange(0, max(H, W) / 2, 0.25)
    px = cx + radii[None] * torch.cos(theta)[:, None]
    py = cy + radii[None] * torch.sin(theta)[:, None]
    grid = torch.stack([(px + 0.5) / W * 2 - 1, (py + 0.5) / H * 2 - 1], dim=-1)[None]
    along = F.grid_sample(sat_map[None, None], grid, align_corners=False)[0, 0]  # [rays, radii]
    r = radii[(along <= SATURATED).float().argmax(1)]  # where each ray first leaves the shape
    spectrum = torch.fft.rfft(r / r.mean().clamp_min(1e-6)).abs() * (2 / RAYS)
    return spectrum[3].item(), spectrum[4].item()


def detect(frames: torch.Tensor) -> dict:
    """The shape in each frame: centroids [T, 2] (x, y; NaN where none), areas [T], and the
    clip's colour, shape and direction labels (None where undecidable)."""
    frames = as_frames(frames)
    sat = saturation(frames)
    mask = sat > SATURATED  # object_mask, from the saturation the outlines are traced on
    T, H, W = mask.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    centres = torch.full((T, 2), float("nan"))
    areas = mask.flatten(1).sum(1).float()
    corners, hues = [], []
    for t in range(T):
        m = mask[t]
        if m.sum() < MIN_AREA:
            continue
        cx, cy = xx[m].mean(), yy[m].mean()
        centres[t] = torch.stack([cx, cy])
        corners.append(outline_harmonics(sat[t], cx.item(), cy.item()))
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
    a3, a4 = torch.tensor(corners).median(0).values.tolist()
    out["shape"] = "triangle" if a3 >= TRIANGLE_A3 else "square" if a4 >= SQUARE_A4 else "circle"
    out["corners"] = (a3, a4)
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
