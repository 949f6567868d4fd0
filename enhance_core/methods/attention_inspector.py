"""Per-layer attention statistics of one conditional model evaluation, and a chart of them.

For every self-attention layer: the normalised attention entropy IE-Adapt ranks layers by (whole
self-attention map, conditional batch elements; attention_entropy.py) and Enhance-A-Video's cross-
frame intensity (mean off-diagonal temporal attention over the video tokens; cross_frame_intensity.py).
The evaluation is one real ComfyUI sampler call at the given sigma (noise scaled onto the latent by
the model's own model_sampling), so conditioning, latent format and patches are the ones sampling uses.

The layers the guidance would register (the top_k highest entropy) also come out as layer lists a
graph can wire: in our numbering for our nodes' `layers` inputs, and as the block numbers ComfyUI's
SkipLayerGuidanceDiT skips. Those are the model's block-replace points (patches_replace["dit"]
[("double_block" | "single_block", j)]) as the family adapter names them in layer order.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

import comfy.sample
import comfy.samplers
import comfy.utils

from ..measures.attention_entropy import call_entropy
from ..measures.cross_frame_intensity import temporal_off_diagonal_mean
from ..models import adapter_for
from ..patching.attention_call import MAPS
from ..patching.layer_routing import SelfAttentionLayers
from ..sampling.entropy_registry import LayerSums, highest, lowest


@dataclass
class AttentionReport:
    sigma: float
    entropy: list  # per layer, normalised [0, 1]
    cfi: list  # per layer, None where the call had fewer than 2 latent frames
    top: list  # the layers IE-Adapt's registry would pick (top_k highest entropy)
    exact: bool
    attention_map: str  # "video tokens" or "whole map": what the entropy was measured over
    # per layer, the block-replace point (kind, j) its self-attention ran inside, or None
    blocks: list

    def layer_list(self) -> str:
        """The registered layers as our nodes' `layers` inputs read them: plain comma-separated
        indices, never ranges (SkipLayerGuidanceDiT reads every number in its text: "7-9" would be 7
        and 9 there)."""
        return ", ".join(map(str, self.top))

    def slg_layers(self) -> tuple[str, str]:
        """(double_layers, single_layers) for SkipLayerGuidanceDiT: the blocks holding the registered
        layers; a layer outside any block-replace point is left out (SLG cannot skip it)."""
        points = {self.blocks[i] for i in self.top if self.blocks[i] is not None}
        return tuple(", ".join(str(j) for k, j in sorted(points) if k == kind) for kind in SLG_BLOCKS)

    def slg_note(self) -> str:
        """What SkipLayerGuidanceDiT receives, and which registered layers it cannot reach."""
        double, single = self.slg_layers()
        missing = [i for i in self.top if self.blocks[i] is None]
        if len(missing) == len(self.top):
            return ("SkipLayerGuidanceDiT: none of these layers is inside a block it can skip (this model has no "
                    "block-replace points there); its outputs are empty")
        note = f"SkipLayerGuidanceDiT: double_layers '{double}', single_layers '{single}'"
        if missing:
            note += f"; layer(s) {', '.join(map(str, missing))} not inside a block it can skip, left out"
        return note

    def lowest(self, ratio: float) -> list:
        """The layers IE-Adapt editing would choose with this pass as its source: the lowest `ratio`."""
        return lowest(dict(enumerate(self.entropy)), ratio)

    def table(self) -> str:
        lines = [f"sigma {self.sigma:.4g}; entropy {'exact' if self.exact else 'sampled estimate'} over {self.attention_map}; "
                 f"IE-Adapt top {len(self.top)}: {', '.join(map(str, self.top))}",
                 f"layers output (FreeVideo nodes' layers inputs): {self.layer_list()}",
                 self.slg_note(),
                 f"IE-Adapt editing at ratio 0.5 (this prompt and latent as the source) replaces layers: "
                 f"{', '.join(map(str, self.lowest(0.5)))}",
                 "layer  entropy  CFI     SLG block"]
        for i, (e, c, b) in enumerate(zip(self.entropy, self.cfi, self.blocks)):
            mark = "  <- registered" if i in self.top else ""
            block = "-" if b is None else f"{b[0].split('_')[0]} {b[1]}"
            lines.append(f"{i:5d}  {e:7.4f}  {'n/a   ' if c is None else f'{c:.4f}'}  {block:9s}{mark}".rstrip())
        return "\n".join(lines)


# The block kinds of ComfyUI's block-replace points, as SkipLayerGuidanceDiT's double_layers and
# single_layers number them.
SLG_BLOCKS = ("double_block", "single_block")


def _one_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion style sampler that evaluates the model once, at sigmas[0]."""
    model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
    return x


def _check_latent(model, latent: dict) -> None:
    """A clear error when the latent is not one this video model samples (an image latent, another
    family's latent), instead of a shape error deep in the model call. Empty latents are accepted as
    ComfyUI's samplers accept them (they take the model's channel count and a frame axis)."""
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        return
    fmt = model.get_model_object("latent_format")
    fixed = comfy.sample.fix_empty_latent_channels(model, samples)
    dims = getattr(fmt, "latent_dimensions", 2)
    if fixed.ndim != dims + 2 or fixed.shape[1] != fmt.latent_channels:
        want = f"[B, {fmt.latent_channels}, T, H, W]" if dims == 3 else f"[B, {fmt.latent_channels}, H, W]"
        raise ValueError(f"latent: shape {tuple(samples.shape)} is not a video latent of this model; its latent format "
                         f"({type(fmt).__name__}) takes {want} latents. Connect the latent the sampler starts from "
                         "(e.g. the model family's empty video latent node, or a video encoded with this model's VAE)")


def inspect_attention(model, latent: dict, positive, sigma: float, seed: int = 0, entropy_rows: int = 0,
                      top_k: int = 1, attention_map: str = "video tokens") -> AttentionReport:
    adapter = adapter_for(model)
    sampling = model.get_model_object("model_sampling")
    lo, hi = float(sampling.sigma_min), float(sampling.sigma_max)
    if not lo <= sigma <= hi * (1 + 1e-6):
        raise ValueError(f"sigma: {sigma} is outside this model's range {lo:.4g} to {hi:.4g}")
    n_layers = len(adapter.sites(model.get_model_object("diffusion_model")))
    if not 1 <= top_k <= n_layers:
        raise ValueError(f"top_k: {top_k}; this model has {n_layers} self-attention layers, use 1 to {n_layers}")
    if entropy_rows < 0:
        raise ValueError(f"entropy_rows: {entropy_rows}; use 0 (exact entropy) or a positive number of query rows per head")
    _check_latent(model, latent)
    if attention_map not in MAPS:
        raise ValueError(f"attention_map: '{attention_map}'; use one of {', '.join(MAPS)}")
    rows = None if entropy_rows == 0 else entropy_rows

    clone = model.clone()
    hooks = SelfAttentionLayers(clone, adapter, "freevideo_attention_inspector", "Attention inspector",
                                fail_if_bypassed=True)
    entropy_sums, cfi_sums = LayerSums(), LayerSums()
    progress = comfy.utils.ProgressBar(n_layers)

    def measure(call):
        cond = call.rows(0)
        if cond:
            video = call.video
            if video is not None and video.frames >= 2:
                index = torch.tensor(cond, device=call.q.device)
                cfi_sums.add(call.layer, temporal_off_diagonal_mean(
                    call.tokens_first(call.q).index_select(0, index)[:, video.start:video.stop],
                    call.tokens_first(call.k).index_select(0, index)[:, video.start:video.stop], video.frames))
            entropy_sums.add(call.layer, call_entropy(call, cond, attention_map, rows))
            progress.update_absolute(len(entropy_sums))
        return call.run()

    hooks.route(range(n_layers), measure)
    samples = comfy.sample.fix_empty_latent_channels(clone, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed)
    sigmas = torch.tensor([float(sigma), 0.0])
    # cfg 1: ComfyUI skips the unconditional pass, so negative = positive is never evaluated.
    with torch.no_grad():
        comfy.sample.sample_custom(clone, noise, 1.0, comfy.samplers.KSAMPLER(_one_evaluation), sigmas, positive, positive,
                                   samples, noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)
    entropies, cfis = entropy_sums.take_means(), cfi_sums.take_means()
    if len(entropies) != n_layers:
        raise RuntimeError(f"attention inspector: measured {len(entropies)} of {n_layers} self-attention layers; "
                           "the model did not run its self-attention through ComfyUI's attention functions")
    entropy = [entropies[i] for i in range(n_layers)]
    cfi = [cfis.get(i) for i in range(n_layers)]
    top = highest(entropies, top_k)
    # SkipLayerGuidanceDiT's numbering: the block-replace point of each layer, as the adapter names
    # them (None: the family has none, or none the adapter names).
    blocks = adapter.prefix_points(model.get_model_object("diffusion_model")) or [None] * n_layers
    return AttentionReport(float(sigma), entropy, cfi, top, rows is None, attention_map, list(blocks))


# chart --------------------------------------------------------------------------------------------
_BG, _AXIS, _TEXT, _GRID = (250, 250, 250), (60, 60, 60), (20, 20, 20), (215, 215, 215)
_BAR, _PICK, _CFI = (70, 120, 180), (235, 120, 30), (90, 160, 90)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def render_chart(report: AttentionReport) -> torch.Tensor:
    """Bar charts of entropy (registered layers highlighted) and CFI per layer: IMAGE [1, H, W, 3] float."""
    from PIL import Image, ImageDraw
    n = len(report.entropy)
    left, right, top_pad = 56, 20, 44
    panel, gap, bottom = 170, 58, 44
    width = max(720, left + right + max(6, min(40, 1100 // max(n, 1))) * n)
    bar = min(60, (width - left - right) // n)
    height = top_pad + 2 * panel + gap + bottom
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    title, small = _font(15), _font(12)
    picks = ", ".join(f"{i} ({report.entropy[i]:.3f})" for i in report.top)
    d.text((left, 6), f"Self-attention entropy ({report.attention_map}) at sigma {report.sigma:.4g} "
                      f"({'exact' if report.exact else 'sampled'}); "
                      f"IE-Adapt top {len(report.top)}: {picks}", fill=_TEXT, font=title)
    plot_w = bar * n
    label_every = max(1, math.ceil(22 / bar))

    def panel_at(y0, values, vmax, colour, name, ticks):
        y1 = y0 + panel
        for t in ticks:
            y = y1 - t / vmax * panel
            d.line([(left, y), (left + plot_w, y)], fill=_GRID)
            d.text((4, y - 7), f"{t:.2f}", fill=_TEXT, font=small)
        for i, v in enumerate(values):
            x0 = left + i * bar
            if v is None:
                continue
            fill = _PICK if (colour is _BAR and i in report.top) else colour
            y_top = y1 - max(v, 0) / vmax * panel
            d.rectangle([x0 + 1, y_top, x0 + bar - 2, y1], fill=fill)
            if bar >= 30:
                d.text((x0 + 2, y_top - 13), f"{v:.2f}"[1:] if 0 <= v < 1 else f"{v:.1f}", fill=_TEXT, font=small)
        d.line([(left, y0), (left, y1), (left + plot_w, y1)], fill=_AXIS)
        for i in range(0, n, label_every):
            d.text((left + i * bar + 1, y1 + 3), str(i), fill=_TEXT, font=small)
        d.text((left, y0 - 16), name, fill=_TEXT, font=small)

    panel_at(top_pad + 14, report.entropy, 1.1, _BAR, "normalised entropy (orange: registered by IE-Adapt)", (0.25, 0.5, 0.75, 1.0))
    cfis = [c for c in report.cfi if c is not None]
    y_cfi = top_pad + 14 + panel + gap
    if cfis:
        vmax = max(max(cfis) * 1.15, 1e-6)
        panel_at(y_cfi, report.cfi, vmax, _CFI, "Enhance-A-Video cross-frame intensity (CFI)", [vmax * f for f in (0.25, 0.5, 0.75)])
    else:
        d.text((left, y_cfi + panel // 2), "CFI needs at least 2 latent frames", fill=_TEXT, font=title)
    d.text((left, height - 16), "layer (position in the model's list of self-attention layers)", fill=_TEXT, font=small)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
