"""IE-Adapt quality guidance (Understanding Attention Mechanism in Video Diffusion Models, sec. 4.1)
on a clone of a ComfyUI video model.

Registry: on the first model evaluation of a sampling run inside the sigma window, the conditional
pass measures the exact normalised attention entropy (the default; measures/attention_entropy.py) of
every self-attention layer and registers the top-k; a manual layer list is measured and logged.

Branches: in extra batch elements that copy the conditional input, the registered layers' attention
map is replaced by the identity I (output = V) or the uniform map U (every row 1/n: output = the mean
of V over the keys, for every query). With the original map A (e_c) that gives
    guided = e_u + s (e_c - e_u) + lambda (e_pos - e_neg),  (pos, neg) in {(U, I), (A, I), (U, A)}
(paper eq. 5). ComfyUI combines denoised predictions, not noise; denoised = x - sigma * eps, and the
lambda term's weights sum to zero, so the same formula on denoised values is exactly eq. 5 on noise.

Batching: the branches are appended to the conds of the step's calc_cond_batch call, so ComfyUI
batches them with cond and uncond when its memory check allows and splits the batch when not (or
deals it over devices); the attention handler perturbs only the branch rows (cond_or_uncond). The
registry evaluation runs the branches in a second call: the choice needs the whole cond forward.

Text tokens (HunyuanVideo, Mochi, CogVideoX joint attention): the paper studies U-Net models whose
temporal and spatial layers attend over video tokens only, and is silent on text in the map. By
default ("video tokens") the map measured and replaced is the video-to-video part: the entropy of
video queries over video keys, U gives every video query the mean value of the video keys, I each
video token its own value, and text rows keep their attention (U mixes no text values into the
video). "whole map" measures and replaces the whole map, text rows and keys included. Families
without text in self-attention (Wan, LTX-Video, Cosmos) give the same result either way.
"""

import logging

import torch

from ..measures.attention_entropy import call_entropy, mask_4d, restrict_to_tokens
from ..models import adapter_for
from ..patching.attention_call import MAPS
from ..patching.layer_lists import parse_layer_list
from ..patching.layer_routing import SelfAttentionLayers
from ..patching.run_state import RunState, per_run_state, run_state
from ..patching.sigma_window import SigmaWindow
from ..sampling.branches import Branch, BranchRunner, batch_plan
from ..sampling.entropy_registry import LayerSums, highest
from ..sampling.shared_prefix import SharedPrefix

log = logging.getLogger(__name__)

BRANCHES = ("uniform", "original", "identity")
# (positive, negative) pairs of the paper (table 2): the positive branch ranks higher in quality
# (U > A > I); (U, I) had the best average rank, (A, I) is perturbed-attention guidance.
PAIRS = (("uniform", "identity"), ("original", "identity"), ("uniform", "original"))
__all__ = ["BRANCHES", "MAPS", "PAIRS", "EntropyGuidance", "apply_entropy_guidance", "replaced_attention"]


def replaced_attention(kind: str, v: torch.Tensor, n_queries: int, mask=None) -> torch.Tensor:
    """Output of attention with map I (kind "identity") or U ("uniform"); v [B, H, Lk, D] -> [B, H, Lq, D].

    U with a mask is softmax(mask) @ V: uniform over the keys each query may attend to."""
    if kind == "identity":
        if v.shape[2] != n_queries:
            raise RuntimeError(f"IE-Adapt: identity map needs a square self-attention map, got {n_queries} queries x {v.shape[2]} keys")
        return v
    if mask is None:
        mean = v.mean(dim=2, keepdim=True, dtype=torch.float32).to(v.dtype)
        return mean.expand(-1, -1, n_queries, -1)
    m = mask_4d(mask)
    weights = torch.zeros(m.shape, device=v.device).masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else m.float()
    weights = weights.softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v).expand(-1, -1, n_queries, -1)


class _Run(RunState):
    """One sampling run: the registered layers and what the registry measured."""

    def __init__(self, registered):
        self.registered = registered  # layer indices; None until the registry evaluation
        self.entropies = {}  # layer -> normalised entropy measured at the registry evaluation
        self.sums = LayerSums()
        self.measuring = True  # the registry evaluation has not run yet
        self.pending = None  # (sigma, x, {branch kind: prediction}) from the step's calc_cond_batch


class EntropyGuidance:
    """One IE-Adapt node's settings and hooks; what a sampling run accumulates lives in its _Run.
    Sampling hooks are closures over this object (ComfyUI deep-copies model_options on every clone;
    a bound method there would copy the model)."""

    def __init__(self, clone, scale: float, positive: str = "uniform", negative: str = "identity", layers: str = "auto",
                 top_k: int = 1, entropy_rows: int = 0, start_percent: float = 0.0, end_percent: float = 1.0,
                 attention_map: str = "video tokens"):
        adapter = adapter_for(clone)
        n_layers = len(adapter.sites(clone.get_model_object("diffusion_model")))
        _check_inputs(scale, positive, negative, top_k, n_layers, entropy_rows, attention_map)
        self.attention_map = attention_map
        self.auto = layers.strip().lower() == "auto"
        if not self.auto and not layers.strip():
            raise ValueError("layers: empty; use 'auto' (register the top_k highest-entropy layers) or indices such as '12' or '10-12, 20'")
        self.manual = None if self.auto else parse_layer_list(layers, n_layers, "layers")
        self.window = SigmaWindow(clone, start_percent, end_percent)
        self.scale, self.positive, self.negative = float(scale), positive, negative
        self.top_k, self.n_layers = top_k, n_layers
        self.rows = None if entropy_rows == 0 else entropy_rows
        self.kinds = tuple(b for b in (positive, negative) if b != "original")  # branches needing a forward
        self.window.follow(clone)
        self._warned = set()
        self.last_run = None
        if self.scale == 0:
            return
        self.key = f"freevideo_ie_adapt_{id(self)}"
        hooks = SelfAttentionLayers(clone, adapter, self.key, "IE-Adapt guidance", fail_if_bypassed=True)
        state = self
        hooks.route(range(n_layers) if self.auto else self.manual, lambda call: state._attention(call))
        self.runner = BranchRunner(clone, self.key, lambda args: state._calc_cond_batch(args))
        # Branches copy the cond up to the first registered layer: they may skip those blocks (shared_prefix.py).
        points = adapter.prefix_points(clone.get_model_object("diffusion_model"))
        self.shares_prefix = points is not None
        if self.shares_prefix:
            SharedPrefix(clone, self.key, points, "IE-Adapt guidance")
        clone.set_model_sampler_post_cfg_function(lambda args: state._post_cfg(args))
        per_run_state(clone, self.key, lambda *a, **kw: state._start_run())

    def _start_run(self):
        # last_run: the latest run, for inspection only; sampling reads the run through the call's options.
        self.last_run = _Run(None if self.auto else list(self.manual))
        return self.last_run

    def _run(self, options):
        run = run_state(options, self.key)
        if run is None and "no run" not in self._warned:
            self._warned.add("no run")
            log.warning("IE-Adapt: the model was called outside a ComfyUI sampling run (no guider); guidance is off there")
        return run

    def _active(self, sigma, cond) -> bool:
        return cond is not None and self.window.contains({"sigmas": sigma})

    # sampling step ----------------------------------------------------------------------------
    def _calc_cond_batch(self, args):
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        run = self._run(args["model_options"])
        if run is not None:
            run.pending = None
        if run is None or not self._active(sigma, conds[0]):
            return self.runner.run(args)[0]
        branches = [Branch(conds[0], kind, copy_of=0) for kind in self.kinds]
        measure = run.measuring
        if run.registered is None:
            # The layer choice needs the finished conditional pass: branches go in a second call.
            out, _ = self.runner.run(args, measure=measure)
            self._finish_measurement(run, sigma)
            if not run.registered:
                run.pending = (sigma, x, {})
                return out
            _, extra = self.runner.run(args, branches, base=False)
        else:
            first = min(run.registered) if self.shares_prefix and run.registered else None
            out, extra = self.runner.run(args, branches, measure=measure, prefix_until=first)
            self._finish_measurement(run, sigma)
        run.pending = (sigma, x, dict(zip(self.kinds, extra)))
        return out

    def _post_cfg(self, args):
        denoised = args["denoised"]
        run = run_state(args["model_options"], self.key)
        if run is None:
            return denoised
        pending, run.pending = run.pending, None
        if pending is None or pending[0] is not args["sigma"] or pending[1] is not args["input"]:
            if not self._active(args["sigma"], args["cond"]):
                return denoised
            # A node applied after this one replaced the calc function: run the branches here.
            pending = (None, None, self._branches_alone(run, args))
        if not run.registered:
            return denoised
        preds = dict(pending[2], original=args["cond_denoised"])
        return denoised + self.scale * (preds[self.positive] - preds[self.negative])

    def _branches_alone(self, run, args):
        model, x, sigma, options, cond = args["model"], args["input"], args["sigma"], args["model_options"], args["cond"]
        if run.measuring:
            self.runner.evaluate(model, [cond], x, sigma, options, measure=True)
            self._finish_measurement(run, sigma)
        if not run.registered:
            return {}
        extra = self.runner.evaluate(model, [None], x, sigma, options, [Branch(cond, kind) for kind in self.kinds])[1:]
        return dict(zip(self.kinds, extra))

    # registry ---------------------------------------------------------------------------------
    def _finish_measurement(self, run, sigma):
        if not run.measuring:
            return
        run.measuring = False
        run.entropies = run.sums.take_means()
        if not run.entropies:
            log.warning("IE-Adapt: the conditional pass reached no self-attention layer; guidance is off for this run")
            run.registered = []
            return
        if run.registered is None:
            run.registered = highest(run.entropies, self.top_k)
        chosen = ", ".join(f"{layer} ({run.entropies[layer]:.3f})" for layer in run.registered)
        values = sorted(run.entropies.values())
        how = f"top {self.top_k} of {self.n_layers} by entropy" if self.auto else "manual list"
        log.info("IE-Adapt: layer(s) %s [%s] at sigma %.4g, normalised attention entropy; measured %d layers, range %.3f-%.3f, median %.3f",
                 chosen, how, float(sigma.max()), len(values), values[0], values[-1], values[len(values) // 2])

    # attention --------------------------------------------------------------------------------
    def _attention(self, call):
        plan = batch_plan(call.options, self.key)
        run = run_state(call.options, self.key)
        if plan is None or run is None:
            return call.run()
        if not call.square:
            # Not the whole sequence attending to itself (a layer splitting its queries over several
            # kernel calls): neither map is defined on a part of it; leave the layer alone.
            if "partial" not in self._warned:
                self._warned.add("partial")
                log.warning("IE-Adapt: self-attention layer %d is not one square kernel call; it is not measured or perturbed", call.layer)
            return call.run()
        if plan.measure:
            cond = call.rows(0)
            if cond:
                run.sums.add(call.layer, call_entropy(call, cond, self.attention_map, self.rows))
        element_kind = [plan.roles.get(c) for c in call.conds]
        if call.layer not in (run.registered or ()) or not any(element_kind):
            return call.run()
        return _perturbed(call, element_kind, call.map_span(self.attention_map))


def _perturbed(call, element_kind, span):
    """The kernel output with the branch elements' map replaced: over the whole map, or (span) over
    the video tokens only, whose text rows then keep the original attention."""
    b = call.batch
    normal = [i for i in range(b) if element_kind[i] is None]
    if (normal and not call.next_is_kernel) or span is not None:
        # Slicing the branch elements out of the kernel call saves their attention, but another
        # override inside ours (another pack, Enhance-A-Video) may keep per-call state shaped
        # like the whole batch: it gets the whole batch.
        out = call.run()
    elif normal:
        index = torch.tensor(normal, device=call.q.device)
        groups = call.options["cond_or_uncond"]
        per = b // len(groups)
        changes = {"transformer_options": dict(call.options, cond_or_uncond=[c for g, c in enumerate(groups) if element_kind[g * per] is None])}
        if "mask" in call.kwargs:
            changes["mask"] = call.mask_rows(index)
        part = call.run(call.q.index_select(0, index), call.k.index_select(0, index), call.v.index_select(0, index), **changes)
        out = part.new_empty((b,) + tuple(part.shape[1:]))
        out[index] = part
    else:
        n_q = call.seq_len
        dim = call.v.shape[-1] if call.skip_reshape else call.v.shape[-1] // call.heads
        out = call.q.new_empty((b, call.heads, n_q, dim) if call.skip_output_reshape else (b, n_q, call.heads * dim))
    vh = call.heads_first(call.v)
    start, stop = span if span is not None else (0, call.seq_len)
    tokens = out[:, :, start:stop] if call.skip_output_reshape else out[:, start:stop]
    for kind in ("identity", "uniform"):
        rows = [i for i in range(b) if element_kind[i] == kind]
        if not rows:
            continue
        index = torch.tensor(rows, device=call.q.device)
        _, vk, m = restrict_to_tokens(vh.index_select(0, index), vh.index_select(0, index), call.mask_rows(index), start, stop)
        r = replaced_attention(kind, vk, stop - start, m)
        if not call.skip_output_reshape:
            r = r.transpose(1, 2).reshape(len(rows), stop - start, -1)
        tokens[index] = r.to(out.dtype)
    return out


def _check_inputs(scale, positive, negative, top_k, n_layers, entropy_rows, attention_map):
    if attention_map not in MAPS:
        raise ValueError(f"attention_map: '{attention_map}'; use one of {', '.join(MAPS)}")
    if scale != scale:
        raise ValueError(f"scale: {scale} is not a number; use 0 (off) to 100")
    if scale < 0:
        raise ValueError(f"scale: {scale} is negative; use 0 (off) or more (the direction is set by the branch pair)")
    for name, value in (("positive_branch", positive), ("negative_branch", negative)):
        if value not in BRANCHES:
            raise ValueError(f"{name}: '{value}' is not a branch; use one of {', '.join(BRANCHES)}")
    allowed = "; ".join(f"{p} / {n}" for p, n in PAIRS)
    if positive == negative:
        raise ValueError(f"positive_branch and negative_branch are both '{positive}': their difference is zero. Use one of (positive / negative): {allowed}")
    if (positive, negative) not in PAIRS:
        raise ValueError(f"positive_branch '{positive}' with negative_branch '{negative}' guides towards lower quality "
                         f"(the paper's ranking is uniform > original > identity). Use one of (positive / negative): {allowed}")
    if not 1 <= top_k <= n_layers:
        raise ValueError(f"top_k: {top_k}; this model has {n_layers} self-attention layers, use 1 to {n_layers}")
    if entropy_rows < 0:
        raise ValueError(f"entropy_rows: {entropy_rows}; use 0 (exact entropy) or a positive number of query rows per head")


def apply_entropy_guidance(model, scale: float, positive: str = "uniform", negative: str = "identity", layers: str = "auto",
                           top_k: int = 1, entropy_rows: int = 0, start_percent: float = 0.0, end_percent: float = 1.0,
                           attention_map: str = "video tokens"):
    """A clone of `model` with IE-Adapt guidance; scale 0 returns a plain clone (bit-identical sampling).

    entropy_rows 0 (exact entropy) is the default: the registry runs once per sampling run, where the
    exact entropy costs about one model call, and the sampled estimate can swap close layers."""
    clone = model.clone()
    EntropyGuidance(clone, scale, positive, negative, layers, top_k, entropy_rows, start_percent, end_percent, attention_map)
    return clone
