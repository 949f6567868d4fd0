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

import torch

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.utils

from ..measures.attention_entropy import call_entropy
from ..models import adapter_for
from ..patching.layer_routing import SelfAttentionLayers
from ..patching.run_state import RunState, per_run_state, run_state
from ..patching.sigma_window import SigmaWindow
from ..sampling.branches import Branch, BranchRunner, batch_plan
from ..sampling.ddim import ddim_inversion_step
from ..sampling.entropy_registry import LayerSums, lowest

log = logging.getLogger(__name__)

SOURCE_CONDS = "freevideo_edit_source"


class _Run(RunState):
    """One sampling run: the guider (its CFG and processed conds), the schedule, the source latents."""

    def __init__(self, guider, sigmas):
        self.guider = guider
        self.sigmas = sigmas
        self.levels = {}  # float sigma -> source latent at that level
        self.layers = None  # chosen at the first active step
        self.entropies = {}
        self.sums = LayerSums()
        self.split_warned = False


class EntropyEditing:
    """One editing node's settings and hooks; what a sampling run accumulates lives in its _Run.
    Hooks are closures over this object (ComfyUI deep-copies model_options on every clone)."""

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
        self.last_run = None
        if self.ratio == 0:
            return
        self.key = f"freevideo_ie_adapt_edit_{id(self)}"
        state = self
        SelfAttentionLayers(self.clone, adapter, self.key, "IE-Adapt editing").route(
            range(self.n_layers), lambda call: state._attention(call))
        self.runner = BranchRunner(self.clone, self.key, lambda args: state._calc_cond_batch(args))
        # The run's holder is made by _new_run, which also adds the source conds to the guider.
        per_run_state(self.clone, self.key, lambda guider, noise, latent_image, sampler, sigmas, *a, **kw:
                      state._start_run(guider, sigmas))
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key + "/source",
                                        lambda executor, *a, **kw: state._new_run(executor, *a, **kw))
        if self.source_latent is not None:
            self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, self.key,
                                            lambda executor, *a, **kw: state._start_at_source(executor, *a, **kw))

    def _start_run(self, guider, sigmas):
        # last_run: the latest run's outcome, for inspection (tests, a caller's report); sampling
        # reads the run only through the call's options.
        self.last_run = _Run(guider, sigmas.detach().float().cpu())
        return self.last_run

    # sampling run -------------------------------------------------------------------------------
    def _new_run(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.source_latent is not None and self.source_latent.shape[1:] != noise.shape[1:]:
            raise ValueError(f"source_latent: shape {tuple(self.source_latent.shape)} does not match the sampled latent "
                             f"{tuple(noise.shape)}; encode the source video at the size you sample")
        guider = executor.class_obj
        # Processed with the run's other conds (the model's own conditioning, areas, devices).
        guider.conds[SOURCE_CONDS] = [c.copy() for c in comfy.sampler_helpers.convert_cond(self.source)]
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.conds.pop(SOURCE_CONDS, None)

    def _calc_cond_batch(self, args):
        conds, sigma = args["conds"], args["sigma"]
        run = run_state(args["model_options"], self.key)
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
        run = run_state(extra_args["model_options"], self.key)
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
        run.entropies = run.sums.take_means()
        run.layers = lowest(run.entropies, self.ratio)
        ranked = sorted(run.entropies, key=lambda layer: (run.entropies[layer], layer))
        log.info("IE-Adapt editing: source attention replaced in layer(s) %s (lowest %.0f%% of %d by entropy at sigma %.4g: %s)",
                 ", ".join(map(str, run.layers)) or "none", 100 * self.ratio, len(ranked), level,
                 ", ".join(f"{layer}: {run.entropies[layer]:.3f}" for layer in ranked))

    # attention ----------------------------------------------------------------------------------
    def _attention(self, call):
        plan = batch_plan(call.options, self.key)
        run = run_state(call.options, self.key)
        if plan is None or not plan.roles or run is None or not call.square:
            return call.run()
        roles = [plan.roles.get(c, ("target", c)) for c in call.conds]
        if plan.measure:
            source = [i for i, r in enumerate(roles) if r == ("source", 0)]
            if source:
                run.sums.add(call.layer, call_entropy(call, source, "video tokens"))
            return call.run()
        if call.layer not in (run.layers or ()):
            return call.run()
        # The target elements take the paired source elements' q and k (video tokens).
        start, stop = call.map_span("video tokens") or (0, call.seq_len)
        q, k = call.q.clone(), call.k.clone()
        targets = [i for i, r in enumerate(roles) if r[0] == "target"]
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
            for t in (q, k):
                t.narrow(call.token_axis, start, stop - start)[tgt] = t.narrow(call.token_axis, start, stop - start)[src]
        return call.run(q, k)


def apply_entropy_editing(model, source_positive, source_latent=None, ratio: float = 0.5,
                          start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` that edits towards the sampler's prompt while keeping the source's structure;
    ratio 0 returns a plain clone (bit-identical sampling)."""
    return EntropyEditing(model, source_positive, source_latent, ratio, start_percent, end_percent).clone
