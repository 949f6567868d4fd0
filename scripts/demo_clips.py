"""Procedural clips for the demo models: one coloured shape moving over a textured background.

Every clip is a pure function of its labels and a seed (no randomness outside a seeded generator),
so the training script, the metrics and the tests see the same world.

- shape: circle, square or triangle (squares and triangles rotate as they move)
- colour: red, green, blue or yellow (saturated; backgrounds are low-saturation textures)
- direction: left, right, up or down; the shape (20-26 px across) travels 19-29 px over the 17 frames and bounces
  (a hop along the other axis, like a ball)

A prompt is the three labels, e.g. "red circle right". The text embedding of a prompt is what the
pack's test node FreeVideoTestTextConditioning (tests/comfy_test_nodes) gives for each label
(2 tokens of width 4096, seeded from the label's text) concatenated in the order colour, shape,
direction: 6 tokens. ComfyUI's ConditioningConcat of three such nodes builds the same tensor in a
workflow. The empty label "" is the unconditional embedding (each slot can be dropped alone).
"""

import hashlib
import math

import torch

SIZE = 64
FRAMES = 17
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.92, 0.14, 0.10), "green": (0.10, 0.72, 0.18), "blue": (0.14, 0.30, 0.95),
           "yellow": (0.95, 0.84, 0.08)}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
LABEL_TOKENS = 2  # tokens per label in the text embedding
TEXT_DIM = 4096   # Wan 2.1's text width (ComfyUI's loader fixes it)


def all_labels() -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction) combination, in a fixed order."""
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def prompt_of(colour: str, shape: str, direction: str) -> str:
    return f"{colour} {shape} {direction}"


def labels_of(prompt: str) -> tuple[str, str, str]:
    colour, shape, direction = prompt.split()
    return colour, shape, direction


def label_embedding(text: str, tokens: int = LABEL_TOKENS, dim: int = TEXT_DIM) -> torch.Tensor:
    """Exactly what FreeVideoTestTextConditioning returns for `text` (a test checks it): [1, tokens, dim]."""
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, dim, generator=g)


def text_embedding(colour: str = "", shape: str = "", direction: str = "") -> torch.Tensor:
    """The 6-token embedding of a prompt; empty labels give the unconditional slots."""
    return torch.cat([label_embedding(colour), label_embedding(shape), label_embedding(direction)], dim=1)


def _background(g: torch.Generator, size: int) -> torch.Tensor:
    """A static, low-saturation texture: a grey level, a faint tint and a few oriented waves."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    r = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    level = r(0.35, 0.65)
    texture = torch.zeros(size, size)
    for _ in range(3):
        angle, cycles, phase = r(0, math.pi), r(1.0, 4.0), r(0, 2 * math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        texture += r(0.03, 0.09) * torch.sin(2 * math.pi * cycles * u / size + phase)
    tint = torch.tensor([r(-0.04, 0.04) for _ in range(3)])
    return (level + texture[None] + tint[:, None, None]).clamp(0, 1)  # [3, H, W]


def _signed_distance(shape: str, px: torch.Tensor, py: torch.Tensor, radius: float, angle: float) -> torch.Tensor:
    """Signed distance (negative inside) of a shape centred at the origin, rotated by `angle`."""
    if shape == "circle":
        return torch.sqrt(px ** 2 + py ** 2) - radius
    c, s = math.cos(angle), math.sin(angle)
    qx, qy = c * px + s * py, -s * px + c * py
    if shape == "square":
        half = radius * 0.85
        return torch.maximum(qx.abs(), qy.abs()) - half
    if shape == "triangle":
        circum = radius * 1.25  # equilateral, circumradius; inradius is half of it
        edges = [qx * math.cos(a) + qy * math.sin(a) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        return torch.stack(edges).amax(0) - circum / 2
    raise ValueError(shape)


def render_clip(colour: str, shape: str, direction: str, seed: int, frames: int = FRAMES, size: int = SIZE) -> dict:
    """One clip: {"video": [3, T, H, W] in [0, 1], "centre": [T, 2] (x, y), "mask": [T, H, W]}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    background = _background(g, size)
    radius = r(10.0, 13.0)  # 20-26 px across: 2.5-3 cells of the VAE's 8x8 grid, so an outline survives
    speed = r(1.2, 1.8)
    dx, dy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    margin = radius + 3
    centre = size / 2
    # along the motion axis: the path is centred with some jitter; across it: anywhere that fits
    along0 = centre - travel / 2 + r(-1, 1) * max(0.0, (size - 2 * margin - travel) / 2)
    across = r(margin + 4, size - margin)
    hop, period = r(0.0, 4.0), r(8.0, 16.0)
    angle0 = r(0, 2 * math.pi)
    spin = (1 if torch.rand((), generator=g).item() < 0.5 else -1) * r(0.05, 0.15)
    colour_rgb = torch.tensor(COLOURS[colour])[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5, torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    video, centres, masks = [], [], []
    for t in range(frames):
        along = along0 + speed * t
        bounce = -hop * abs(math.sin(math.pi * t / period))  # hops towards the top / left
        if dx != 0:
            x = along if dx > 0 else size - along
            y = across + bounce
        else:
            y = along if dy > 0 else size - along
            x = across + bounce
        d = _signed_distance(shape, xx - x, yy - y, radius, angle0 + spin * t)
        alpha = torch.sigmoid(-d / 0.5)
        video.append(background * (1 - alpha) + colour_rgb * alpha)
        centres.append((x, y))
        masks.append(alpha > 0.5)
    return {"video": torch.stack(video, dim=1), "centre": torch.tensor(centres), "mask": torch.stack(masks)}


def clip_labels(index: int) -> tuple[str, str, str]:
    """Labels of clip `index` of a data set: cycles through every combination."""
    combos = all_labels()
    return combos[index % len(combos)]
