"""IE-Adapt video editing (Understanding Attention Mechanism in Video Diffusion Models, sec. 4.2) on a clone of a
ComfyUI video model (docs/nodes/entropy_editing.md is the user's account).

The target is sampled with the sampler's prompt; a source branch (sampling/branches.py) runs the source prompt
at the same noise level. At the first step in the window the source's self-attention entropy of every layer is
measured and the lowest `ratio` chosen (low entropy holds the structure). There the target's map is the
source's, softmax(q k^T / sqrt(d)): target rows take the source's q and k with their own v (cond with cond,
uncond with uncond, entry with entry). In joint attention (text in self-attention) the video queries take the
source's keys over video and text, and the text queries keep their own map (patching/map_transplant.py).

ComfyUI decides the forwards: a source it cannot batch with its target (another text shape) runs first; a
forward that runs a source without its targets stores their q and k for the step (sampling/row_pairs.py); a
target that still ran before its source is evaluated again.

The source's trajectory, one latent per level (sampling/trajectory.py): generated from the sampler's noise by
Euler steps with plain CFG (exact for euler without CFG modifiers), from the run's first step even before the
window opens; or a real video's DDIM inversion, whose top latent replaces the sampler's start only in a run at
the top of the schedule. A stage that ends with leftover noise hands the source on to the sampler that continues
its latent (sampling/stage_handover.py). Under a noise mask (SetLatentNoiseMask, differential diffusion) the
source gets the sampler's blends (sampling/noise_mask.py): outside the mask it sees the video the target sees.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

import comfy.patcher_extension
import comfy.sampler_helpers

from ..measures.attention_entropy import call_entropy
from ..models import adapter_for
from ..patching.layer_routing import SelfAttentionLayers
from ..patching.map_transplant import own_attention_rows, take_map, text_tokens
from ..patching.run_state import RunState, per_run_state, run_state
from ..patching.sigma_window import SigmaWindow
from ..sampling.branches import Branch, BranchRunner, batch_plan
from ..sampling.entropy_registry import LayerSums, lowest
from ..sampling.noise_mask import NoiseMask
from ..sampling.row_pairs import CondPairs
from ..sampling.stage_handover import StageHandover
from ..sampling.step_store import StepStore
from ..sampling.trajectory import as_sampled, euler_cfg_step, invert_up, start_from_inversion, starts_at_top

log = logging.getLogger(__name__)

SOURCE_CONDS = "freevideo_edit_source"


class _Run(RunState):
    """One sampling run: the guider (its CFG and processed conds), the schedule, the source latents."""

    def __init__(self, guider, sigmas):
        self.guider, self.sigmas = guider, sigmas  # the guider until the run ends
        self.levels = {}  # float sigma -> source latent at that level
        self.layers = None  # chosen at the first active step
        self.entropies, self.sums = {}, LayerSums()
        self.store = StepStore()  # the source's q and k for targets in another forward of the step
        self.missed = set()  # target conds a forward of this step could not edit (their source had not run)
        self.replays = 0  # steps whose missed targets were evaluated again
        self.warned = set()  # what the log said once in this run
        self.mask = None  # the latent's noise mask (NoiseMask), applied to the source as to the target


@dataclass(frozen=True)
class _Step:
    """What the attention handler needs for one step's evaluations."""
    edit: bool  # inside the window, the layers chosen
    pairs: CondPairs  # target cond (0, 1) -> its source branch, entry by entry
    replay: bool = False  # the missed targets, evaluated again with their source's q and k stored


_PARTLY = {"video tokens": "the prompts differ in token count: in joint attention the video rows take the source's video "
                           "q and k only and still attend to the target's own text keys",
           "": "source and target attention of different shapes (an area or a mask on a cond): not edited"}
_HANDOVER = StageHandover()  # shared by every editing node: Wan 2.2's two experts have one each


class EntropyEditing:
    """One editing node's settings and its hooks on the clone it is given (closures over this object,
    which keeps no reference to the clone); what a sampling run accumulates lives in its _Run."""

    def __init__(self, clone, source_positive, source_latent=None, ratio: float = 0.5,
                 start_percent: float = 0.0, end_percent: float = 1.0):
        if not 0.0 <= ratio <= 1.0 or ratio != ratio:
            raise ValueError(f"ratio: {ratio}; use a fraction of the self-attention layers from 0 (off) to 1")
        adapter = adapter_for(clone)
        self.n_layers = len(adapter.sites(clone.get_model_object("diffusion_model")))
        self.window = SigmaWindow(clone, start_percent, end_percent)
        self.source = source_positive
        self.source_latent = None if source_latent is None else source_latent["samples"]
        if self.source_latent is not None and self.source_latent.ndim != 5:
            raise ValueError(f"source_latent: a {self.source_latent.ndim}-D latent; connect the source video's latent "
                             "(VAE Encode of the video, [B, C, T, H, W])")
        self.ratio = float(ratio)
        self.window.follow(clone)
        self.last_run = None
        if self.ratio == 0:
            return
        self.key = f"freevideo_ie_adapt_edit_{id(self)}"
        state = self
        SelfAttentionLayers(clone, adapter, self.key, "IE-Adapt editing", fail_if_bypassed=True).route(
            range(self.n_layers), lambda call: state._attention(call))
        self.runner = BranchRunner(clone, self.key, lambda args: state._calc_cond_batch(args))
        # The run's holder is made by _new_run, which also adds the source conds to the guider.
        per_run_state(clone, self.key, lambda guider, noise, latent_image, sampler, sigmas, *a, **kw:
                      state._start_run(guider, sigmas))
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key + "/source",
                                   lambda executor, *a, **kw: state._new_run(executor, *a, **kw))
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, self.key,
                                   lambda executor, *a, **kw: state._sampler_sample(executor, *a, **kw))

    def _start_run(self, guider, sigmas):
        # last_run: the latest run, for inspection; sampling reads the run through the call's options.
        self.last_run = _Run(guider, sigmas.detach().float().cpu())
        return self.last_run

    def _new_run(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.source_latent is not None and as_sampled(self.source_latent).shape[1:] != noise.shape[1:]:
            raise ValueError(f"source_latent: shape {tuple(self.source_latent.shape)} does not match the sampled latent "
                             f"{tuple(noise.shape)}; encode the source video at the size you sample")
        guider = executor.class_obj
        run = run_state(guider.model_options, self.key)
        if run is not None and self.source_latent is None:
            self._continue_stage(run, guider, noise, latent_image, sigmas)
        # Processed with the run's other conds (the model's own conditioning, areas, devices).
        guider.conds[SOURCE_CONDS] = [c.copy() for c in comfy.sampler_helpers.convert_cond(self.source)]
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            guider.conds.pop(SOURCE_CONDS, None)
            if run is not None:  # last_run outlives the run, the guider (holding the clone, which holds us) must not
                run.guider = run.mask = None
        if run is not None and self.source_latent is None:  # the source handed on to a next stage, if any
            _HANDOVER.record(out, sigmas, run.levels, (self.key, run.layers, run.entropies))
        return out

    def _continue_stage(self, run, guider, noise, latent_image, sigmas):
        """A generated source in a later stage continues its trajectory from the stage that
        returned this run's latent; a run at the top of the schedule starts it afresh."""
        if starts_at_top(guider.model_patcher.get_model_object("model_sampling"), sigmas):
            return
        found = _HANDOVER.find(latent_image, noise, sigmas, run.levels)
        if found is not None and found[0] == self.key:  # the same node: the one run's layer choice holds
            run.layers, run.entropies = found[1:]
        if found is not None:
            log.info("IE-Adapt editing: the source continues its trajectory from the stage that ended at sigma %.4g",
                     float(sigmas[0]))
        else:
            log.warning("IE-Adapt editing: this run starts at sigma %.4g, below the top of the schedule, from a latent "
                        "no edited stage returned (or with noise added): the source starts from the target's latent "
                        "here, not from its own trajectory", float(sigmas[0]))

    def _calc_cond_batch(self, args):
        conds, sigma = args["conds"], args["sigma"]
        run = run_state(args["model_options"], self.key)
        if run is None or conds[0] is None:
            return self.runner.run(args)[0]
        level = float(sigma.max())
        inside = self.window.contains({"sigmas": sigma})
        # A generated source advances from the run's first step, even before the window opens.
        if not inside and not (self.source_latent is None and level > self.window.sigma_start):
            return self.runner.run(args)[0]
        if not run.levels and self.source_latent is None:  # the sampler's own start (before a mask's blend)
            run.levels[level] = args["input"] if run.mask is None else run.mask.start
        x_src = run.levels.get(level)
        if x_src is None:
            log.warning("IE-Adapt editing: the source has no latent at sigma %.4g (a sampler that evaluates between "
                        "schedule levels); this step is not edited", level)
            return self.runner.run(args)[0]
        if run.mask is not None:  # outside a noise mask the source sees what the target sees
            x_src = run.mask.model_input(x_src, sigma, args["model_options"])
        branches = [Branch(run.guider.conds[SOURCE_CONDS], ("source", 0), x_src)]
        if len(conds) > 1 and conds[1] is not None:
            branches.append(Branch(conds[1], ("source", 1), x_src))
        n = len(conds)
        every = list(conds) + [b.cond for b in branches]
        step = _Step(inside, CondPairs.of(every, {b.role[1]: n + j for j, b in enumerate(branches)}))
        if inside and run.layers is None:
            # The choice needs the source's finished pass: measure it alone first (once per run).
            self.runner.run(args, branches, measure=True, base=False, payload=step)
            self._choose(run, level)
        run.store.clear()
        run.missed.clear()
        try:
            # A source ComfyUI would run in a forward of its own anyway runs first: its target then finds it stored.
            first = {n + j for j in range(len(branches))} & step.pairs.apart(every, args["input"], sigma)
            out, source_out = self.runner.run_first(args, branches, first, payload=step)
            if run.missed:
                self._replay(args, run, step, out)
        finally:
            run.store.clear()
        self._advance(run, level, source_out, args)
        return out

    def _replay(self, args, run, step, out):
        """Targets that ran before their source in this step (forwards ComfyUI ran at once on
        several devices): evaluated again, alone, now that the source's q and k are stored."""
        missed = sorted(run.missed)
        run.replays += 1
        self._warn(run, "replay", f"target cond(s) {missed} ran before their source: evaluated again with the "
                   "source's stored q and k (one more forward of them in such steps)")
        conds = [c if i in missed else None for i, c in enumerate(args["conds"])]
        again = self.runner.run(dict(args, conds=conds), payload=dataclasses.replace(step, replay=True))[0]
        for i in missed:
            out[i] = again[i]

    def _sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs):
        """A real video: DDIM-invert it with the source prompt up the run's schedule (its inverted latents are
        the source's trajectory); a run at the top of the schedule starts the target where the inversion ends
        (the paper edits a real video from its inverted noise), a later stage continues from its input. Then the
        run's noise mask, if its latent has one, with the noise the sampler holds, for the source branch."""
        run = run_state(extra_args["model_options"], self.key)
        model, options = guider.inner_model, extra_args["model_options"]
        if run is not None and self.source_latent is not None:
            def predict(z, level):
                s = torch.full((z.shape[0],), level, device=z.device, dtype=sigmas.dtype)
                return self.runner.evaluate(model, [run.guider.conds[SOURCE_CONDS]], z, s, options)[0]
            x = model.process_latent_in(as_sampled(self.source_latent).to(noise)).expand_as(noise).clone()
            start = invert_up(predict, x, sigmas, model.model_sampling, run.levels)
            top = executor.class_obj.max_denoise(guider, sigmas)  # as the sampler will call it
            noise = start_from_inversion(model.model_sampling, sigmas, start, noise, latent_image, top, "IE-Adapt editing")
        if run is not None:
            run.mask = NoiseMask.of_run(executor.class_obj, guider, sigmas, extra_args, noise, latent_image,
                                        args[0] if args else kwargs.get("denoise_mask"))
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs)

    def _advance(self, run, level, source_out, args):
        """The source's next latent on the schedule (a generated source): an Euler step with plain
        CFG (and the noise mask's prediction), so equal prompts follow the euler sampler exactly."""
        index = [i for i, s in enumerate(run.sigmas.tolist()) if s == level]
        if self.source_latent is None and index and index[0] + 1 < len(run.sigmas):
            x_src = run.levels[level]
            sigma, nxt = run.sigmas[index[0]:index[0] + 2].to(x_src)
            held = None if run.mask is None else lambda d: run.mask.prediction(d, args["sigma"], args["model_options"])
            run.levels[float(run.sigmas[index[0] + 1])] = euler_cfg_step(x_src, source_out, run.guider.cfg, sigma, nxt, held)

    def _choose(self, run, level):
        run.entropies = run.sums.take_means()
        run.layers = lowest(run.entropies, self.ratio)
        ranked = sorted(run.entropies, key=lambda layer: (run.entropies[layer], layer))
        log.info("IE-Adapt editing: source attention replaced in layer(s) %s (lowest %.0f%% of %d by entropy at sigma %.4g: %s)",
                 ", ".join(map(str, run.layers)) or "none", 100 * self.ratio, len(ranked), level,
                 ", ".join(f"{layer}: {run.entropies[layer]:.3f}" for layer in ranked))

    def _attention(self, call):
        plan = batch_plan(call.options, self.key)
        run = run_state(call.options, self.key)
        step = None if plan is None else plan.payload
        if not isinstance(step, _Step) or run is None or not call.square:
            return call.run()
        if plan.measure:
            source = call.rows(step.pairs.sources[0])
            if source:
                run.sums.add(call.layer, call_entropy(call, source, "video tokens"))
            return call.run()
        if not step.edit or call.layer not in (run.layers or ()):
            return call.run()
        return self._edit(call, run, step)

    def _edit(self, call, run, step):
        """The target rows take their source rows' q and k: from this call where the source is in
        it, else from the step's store (where a forward that ran the source left them)."""
        window = call.options.get("context_window")  # ComfyUI's context windows pair window by window
        key = (call.layer, None if window is None else tuple(window.index_list))
        span = call.map_span("video tokens")
        found = step.pairs.pair(call.options, call.batch, key, run.store, lambda rows: (call.q[rows], call.k[rows], span))
        q, k = call.q.clone(), call.k.clone()
        own_text = []
        for target, rows, source in found:
            if source is None and step.replay:
                self._warn(run, "unpaired", "a target call found no source q and k even after the source ran; not edited")
            elif source is None:
                run.missed.add(target)
            else:
                taken = take_map(call, q, k, rows, *source)
                own_text += [rows] if taken == "video and text keys" else []
                if taken in _PARTLY:
                    self._warn(run, taken, _PARTLY[taken])
        out = call.run(q, k)
        if own_text:
            own_attention_rows(call, out, own_text, text_tokens(call))
        return out

    @staticmethod
    def _warn(run, key, message):
        if key not in run.warned:
            run.warned.add(key)
            log.warning("IE-Adapt editing: %s", message)


def apply_entropy_editing(model, source_positive, source_latent=None, ratio: float = 0.5,
                          start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` that edits towards the sampler's prompt while keeping the source's structure;
    ratio 0 returns a plain clone (bit-identical sampling)."""
    clone = model.clone()
    EntropyEditing(clone, source_positive, source_latent, ratio, start_percent, end_percent)
    return clone
