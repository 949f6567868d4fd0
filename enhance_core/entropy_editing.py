"""IE-Adapt video editing (Understanding Attention Mechanism in Video Diffusion Models, sec. 4.2) on a
clone of a ComfyUI video model.

The target video is sampled with the sampler's own prompt. A source branch (branch_runner.py) runs in
the same forward, at the same noise level, with the source prompt. At the first active step the
source's self-attention entropy of every layer is measured (exact; video tokens only where text is
in self-attention) and the layers in the lowest `ratio` are chosen: low-entropy maps hold the
structure, high-entropy ones the look (paper). In the chosen layers the target's attention map is
the source's: for a DiT the map is softmax(q k^T / sqrt(d)), so the target uses the source's q and k
with its own v, element by element (target cond with the source's cond, uncond with uncond).

Source trajectory, one latent per noise level and nothing per layer (q and k of every layer and step
would take about 150 GB for Wan 1.3B at 81 frames):
- no source latent: the source is generated from the sampler's own noise, advanced by Euler steps on
  the sampler's schedule with the sampler's CFG: with the euler sampler, exactly the trajectory the
  sampler takes with the source prompt;
- a source latent (a real video): DDIM-inverted with the source prompt (the EVS sampler's inversion
  step) up the run's schedule before the first step; the inverted latents are the trajectory, and
  the target starts from the last of them instead of the sampler's noise (paper: editing a real
  video starts from its inversion).
"""

import logging
import threading
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.utils

from .attention_entropy import attention_entropy, heads_first, restrict_to_tokens
from .attention_hooks import SelfAttentionLayers, SigmaWindow
from .branch_runner import Branch, BranchRunner, call_plan, cond_of_rows
from .entropy_guidance import map_span
from .evs_sampler import ddim_inversion_step
from .models import adapter_for

log = logging.getLogger(__name__)

SOURCE_CONDS = "freevideo_edit_source"


@dataclass
class _Run:
    """One sampling run: the guider (its CFG and processed conds), the schedule, the source latents."""

    guider: object
    sigmas: torch.Tensor
    levels: dict = field(default_factory=dict)  # float sigma -> source latent at that level
    layers: list | None = None  # chosen at the first active step
    split_warned: bool = False


class EntropyEditing:
    """The state and hooks of one editing node's clone (hooks are closures over it, see
    EntropyGuidance)."""

    def __init__(self, model, source_positive, source_latent=None, ratio: float = 0.5,
                 start_percent: float = 0.0, end_percent: float = 1.0):
        if not 0.0 <= ratio <= 1.0 or ratio != ratio:
            raise ValueError(f"ratio: {ratio}; use a fraction of the self-attention layers from 0 (off) to 1")
        adapter = adapter_for(model)
        self.n_layers = len(adapter.sites(model.get_model_object("diffusion_model")))
        self.window = SigmaWindow(model, start_percent, end_percent)
        if source_latent is not None:
            samples = source_latent["samples"]
            if samples.ndim != 5:
                raise ValueError(f"source_latent: a {samples.ndim}-D latent; connect the source video's latent "
                                 "(VAE Encode of the video, [B, C, T, H, W])")
        self.source = source_positive
        self.source_latent = None if source_latent is None else source_latent["samples"]
        self.ratio = float(ratio)
        self.clone = model.clone()
        self.window.follow(self.clone)
        self.run = None
        self.entropies = {}
        self._sink = {}
        self._lock = threading.Lock()  # multi-GPU work units measure layers concurrently
        if self.ratio == 0:
            return
        self.key = f"freevideo_ie_adapt_edit_{id(self)}"
        state = self
        SelfAttentionLayers(self.clone, adapter, self.key, "IE-Adapt editing").route(range(self.n_layers), self._attention)
        self.runner = BranchRunner(self.clone, self.key, lambda args: state._calc_cond_batch(args))
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key,
                                        lambda executor, *a, **kw: state._new_run(executor, *a, **kw))
        if self.source_latent is not None:
            self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, self.key,
                                            lambda executor, *a, **kw: state._start_at_source(executor, *a, **kw))

    # sampling run -------------------------------------------------------------------------------
    def _new_run(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.source_latent is not None and self.source_latent.shape[1:] != noise.shape[1:]:
            raise ValueError(f"source_latent: shape {tuple(self.source_latent.shape)} does not match the sampled latent "
                             f"{tuple(noise.shape)}; encode the source video at the size you sample")
        guider = executor.class_obj
        # Processed with the run's other conds (the model's own conditioning, areas, devices).
        guider.conds[SOURCE_CONDS] = [c.copy() for c in comfy.sampler_helpers.convert_cond(self.source)]
        self.run = _Run(guider, sigmas.detach().float().cpu())
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.conds.pop(SOURCE_CONDS, None)
            self.run = None

    def _calc_cond_batch(self, args):
        conds, sigma = args["conds"], args["sigma"]
        run = self.run
        if run is None or conds[0] is None or not self.window.contains({"sigmas": sigma}):
            return self.runner.run(args)[0]
        level = float(sigma.max())
        x_src = self._source_at(run, args, level)
        if x_src is None:
            log.warning("IE-Adapt editing: the source has no latent at sigma %.4g (a sampler that evaluates between "
                        "schedule levels); this step is not edited", level)
            return self.runner.run(args)[0]
        source = run.guider.conds[SOURCE_CONDS]
        branches = [Branch(source, ("source", 0), x_src)]
        if len(conds) > 1 and conds[1] is not None:
            branches.append(Branch(conds[1], ("source", 1), x_src))
        if run.layers is None:
            # The choice needs the source's finished pass: measure it alone first (once per run).
            self.runner.run(args, branches, measure=True, base=False)
            self._choose(run, level)
        out, source_out = self.runner.run(args, branches)
        self._advance(run, level, x_src, source_out)
        return out

    def _source_at(self, run, args, level):
        if not run.levels and self.source_latent is None:
            run.levels[level] = args["input"]  # the sampler's own noise: the same start
        return run.levels.get(level)

    def _start_at_source(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs):
        """A real video: DDIM-invert it with the source prompt up the run's schedule, and start the
        target where the inversion ends (the paper edits a real video from its inverted noise).
        The sampler's first latent is noise_scaling(sigma_0, noise, latent_image), linear in the
        noise, whatever the model's sampling: the noise that makes it the inverted latent replaces
        the sampler's own."""
        run = self.run
        if run is not None:
            model = guider.inner_model
            start = self._invert(run, model, extra_args["model_options"], noise, sigmas)
            scaling = model.model_sampling.noise_scaling
            max_denoise = executor.class_obj.max_denoise(guider, sigmas)  # as the sampler will call it
            offset = scaling(sigmas[0], torch.zeros_like(start), latent_image, max_denoise)
            slope = scaling(sigmas[0], torch.ones_like(start), latent_image, max_denoise) - offset
            if bool((slope == 0).any()):
                log.warning("IE-Adapt editing: this model's sampling does not start from noise (%s), so the target "
                            "cannot start from the inverted source; it starts where the sampler starts",
                            type(model.model_sampling).__name__)
            else:
                noise = (start - offset) / slope
                log.info("IE-Adapt editing: the source video was inverted over %d levels up to sigma %.4g; the target "
                         "starts from the inverted latent, not from the sampler's noise", len(run.levels), float(sigmas[0]))
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs)

    def _invert(self, run, model, options, like, sigmas):
        """The source latent DDIM-inverted up every level of `sigmas`, into run.levels; returns the
        latent at the first (highest) level."""
        x = model.process_latent_in(self.source_latent.to(like)).expand_as(like).clone()
        source = run.guider.conds[SOURCE_CONDS]

        def predict(z, level):
            s = torch.full((z.shape[0],), level, device=z.device, dtype=sigmas.dtype)
            return self.runner.evaluate(model, [source], z, s, options)[0]
        levels = [float(s) for s in sigmas.flip(0) if float(s) > 0]
        progress = comfy.utils.ProgressBar(len(levels))
        previous = 0.0
        for level in levels:
            x, _ = ddim_inversion_step(predict, x, previous, level, model.model_sampling)
            run.levels[level] = x
            previous = level
            progress.update(1)
        return x

    def _advance(self, run, level, x_src, source_out):
        """The source's next latent on the schedule: an Euler step with the source's CFG prediction
        (ComfyUI's cfg and euler formulas, so equal prompts follow the sampler exactly)."""
        if self.source_latent is not None:
            return
        index = [i for i, s in enumerate(run.sigmas.tolist()) if s == level]
        if not index or index[0] + 1 >= len(run.sigmas):
            return
        nxt = run.sigmas[index[0] + 1].to(x_src)
        cond = source_out[0]
        denoised = cond if len(source_out) == 1 else source_out[1] + (cond - source_out[1]) * run.guider.cfg
        sigma = run.sigmas[index[0]].to(x_src)
        run.levels[float(run.sigmas[index[0] + 1])] = x_src + (x_src - denoised) / sigma * (nxt - sigma)

    # registry -----------------------------------------------------------------------------------
    def _choose(self, run, level):
        with self._lock:
            sink, self._sink = self._sink, {}
        self.entropies = {layer: total / count for layer, (total, count) in sorted(sink.items())}
        ranked = sorted(self.entropies, key=lambda layer: (self.entropies[layer], layer))
        run.layers = sorted(ranked[:round(self.ratio * len(ranked))])
        log.info("IE-Adapt editing: source attention replaced in layer(s) %s (lowest %.0f%% of %d by entropy at sigma %.4g: %s)",
                 ", ".join(map(str, run.layers)) or "none", 100 * self.ratio, len(ranked), level,
                 ", ".join(f"{layer}: {self.entropies[layer]:.3f}" for layer in ranked))

    # attention ----------------------------------------------------------------------------------
    def _attention(self, layer, layout, call_next, q, k, v, heads, **kwargs):
        options = kwargs.get("transformer_options") or {}
        plan = call_plan(options, self.key)
        if plan is None or not plan.roles:
            return call_next(q, k, v, heads, **kwargs)
        skip_reshape = kwargs.get("skip_reshape", False)
        axis = 2 if skip_reshape else 1
        if q.shape[axis] != k.shape[axis]:
            return call_next(q, k, v, heads, **kwargs)
        rows = cond_of_rows(options, q.shape[0])
        roles = [plan.roles.get(c, ("target", c)) for c in rows]
        span = map_span("video tokens", layout, q.shape[axis]) or (0, q.shape[axis])
        if plan.measure:
            self._measure(layer, roles, span, q, k, heads, kwargs)
            return call_next(q, k, v, heads, **kwargs)
        run = self.run
        if run is None or layer not in (run.layers or ()):
            return call_next(q, k, v, heads, **kwargs)
        # The target elements take the paired source elements' q and k (video tokens).
        targets = [i for i, r in enumerate(roles) if r[0] == "target"]
        q, k = q.clone(), k.clone()
        start, stop = span
        for kind in (0, 1):
            tgt = [i for i in targets if roles[i][1] == kind]
            src = [i for i, r in enumerate(roles) if r == ("source", kind)]
            if not tgt:
                continue
            if len(src) != len(tgt):
                if not run.split_warned:
                    run.split_warned = True
                    log.warning("IE-Adapt editing: ComfyUI ran the source and the target in separate forwards (memory "
                                "was short); their attention could not be paired in some calls, so those were not edited")
                continue
            for t_, s_ in ((q, q), (k, k)):
                t_.narrow(axis, start, stop - start)[tgt] = s_.narrow(axis, start, stop - start)[src]
        return call_next(q, k, v, heads, **kwargs)

    def _measure(self, layer, roles, span, q, k, heads, kwargs):
        rows = [i for i, r in enumerate(roles) if r == ("source", 0)]
        if not rows:
            return
        skip_reshape = kwargs.get("skip_reshape", False)
        index = torch.tensor(rows, device=q.device)
        qs = heads_first(q, heads, skip_reshape).index_select(0, index)
        ks = heads_first(k, heads, skip_reshape).index_select(0, index)
        mask = kwargs.get("mask")
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0] > 1:
            mask = mask.index_select(0, index)
        qs, ks, mask = restrict_to_tokens(qs, ks, mask, *span)
        e = attention_entropy(qs, ks, mask, rows=None)
        with self._lock:
            total, count = self._sink.get(layer, (0.0, 0))
            self._sink[layer] = (total + float(e.sum()), count + e.numel())


def apply_entropy_editing(model, source_positive, source_latent=None, ratio: float = 0.5,
                          start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` that edits towards the sampler's prompt while keeping the source's structure;
    ratio 0 returns a plain clone (bit-identical sampling)."""
    return EntropyEditing(model, source_positive, source_latent, ratio, start_percent, end_percent).clone
