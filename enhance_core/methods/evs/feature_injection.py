"""EVS's Selective Feature Injection (Eq. 11 of the paper) on the video model's self-attention."""

import logging

from ...models import adapter_for
from ...patching.layer_lists import parse_layer_list
from ...patching.layer_routing import SelfAttentionLayers

log = logging.getLogger(__name__)


class SelectiveFeatureInjection:
    """Records Q, K, V of chosen self-attention layers of the video model during the DDIM inversion,
    and in the [T2V] steps replaces them: Attn(gamma*Q_inv + (1-gamma)*Q, K_inv, V_inv) (Eq. 11).

    Video tokens only: in joint-attention families (HunyuanVideo, Mochi, CogVideoX) the text tokens of
    every branch keep their own Q, K, V. The inversion runs with the positive prompt; injecting its
    text keys and values into the unconditional branch would pull that branch towards the positive
    prompt (wrong CFG), and the paper's U-Net layers hold video tokens only.

    Features are matched by noise level: a denoising call uses those the inversion recorded at the
    nearest level (the same level for first-order samplers). Only the levels the block evaluates are
    kept. With context windows (the model sees a few frames at a time) they are matched by window
    too: the inversion runs window by window with the same schedule, and each window gets its own
    frames' features; a window the inversion did not see is not injected, with a warning. Memory:
    layers x n_V x windows x 3 tensors of one conditional batch of a window's video tokens.
    """

    def __init__(self, clone, layers: str, gamma: float):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"sfi_gamma: {gamma}; use a value in [0, 1]")
        try:
            adapter = adapter_for(clone)
        except ValueError as e:
            raise ValueError(f"video_model (Selective Feature Injection): {e}") from None
        self.hooks = SelfAttentionLayers(clone, adapter, "freevideo_evs_sfi", "EVS feature injection")
        self.layers = parse_layer_list(layers, len(self.hooks.sites), "sfi_layers")
        self.gamma = gamma
        self.mode = None  # None, "record" or "inject"
        self.sigma = None
        self.levels = []
        self.store = {}
        self._warned = set()
        state = self
        self.hooks.route(self.layers, lambda call: state._attention(call))

    def keep_levels(self, sigmas) -> None:
        self.levels = [float(s) for s in sigmas if float(s) > 0]

    def _level(self, exact: bool):
        if self.sigma is None or not self.levels:
            return None
        best = min(range(len(self.levels)), key=lambda i: abs(self.levels[i] - self.sigma))
        if exact and abs(self.levels[best] - self.sigma) > 1e-6 * max(1.0, self.sigma):
            return None
        return best

    def _warn(self, key, message, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _attention(self, call):
        if self.mode is None:
            return call.run()
        video = call.video
        if video is None:
            self._warn("layout", "EVS SFI: self-attention layer %d has no whole video in this kernel call; not injected there", call.layer)
            return call.run()
        axis, start, length = call.token_axis, video.start, video.stop - video.start
        window = _window(call.options)
        if self.mode == "record":
            level = self._level(exact=True)
            if level is not None:
                self.store[(level, call.layer, window)] = tuple(t.narrow(axis, start, length).detach().clone()
                                                                for t in (call.q, call.k, call.v))
            return call.run()
        level = self._level(exact=False)
        saved = self.store.get((level, call.layer, window))
        if saved is None:
            if any(key[:2] == (level, call.layer) for key in self.store):
                self._warn("window", "EVS SFI: the inversion recorded no features for the frames of this context window "
                           "(%s); layer %d is not injected there", _describe(window), call.layer)
            return call.run()
        q_inv, k_inv, v_inv = saved
        video_q = call.q.narrow(axis, start, length)
        reps = call.batch // q_inv.shape[0] if q_inv.shape[0] else 0
        if reps < 1 or call.batch != reps * q_inv.shape[0] or video_q.shape[1:] != q_inv.shape[1:]:
            self._warn("shape", "EVS SFI: the video tokens of layer %d differ from the inversion's (%s vs %s); not injected there",
                       call.layer, tuple(video_q.shape), tuple(q_inv.shape))
            return call.run()
        # cond and uncond run as one batch or one at a time: tile the (conditional) record.
        tile = lambda t: t.repeat(reps, *([1] * (t.ndim - 1))) if reps > 1 else t  # noqa: E731
        q, k, v = call.q.clone(), call.k.clone(), call.v.clone()
        q.narrow(axis, start, length).mul_(1.0 - self.gamma).add_(tile(q_inv).to(q), alpha=self.gamma)
        k.narrow(axis, start, length).copy_(tile(k_inv))
        v.narrow(axis, start, length).copy_(tile(v_inv))
        return call.run(q, k, v)


def _window(transformer_options: dict):
    """The context window of a model call (ComfyUI's context-windows node), as the frames it sees: the
    window's frame indices and, in newer ComfyUI, the anchor frame it prepends; None without one."""
    window = transformer_options.get("context_window")
    if window is None:
        return None
    return getattr(window, "causal_anchor_index", None), tuple(window.index_list)


def _describe(window) -> str:
    if window is None:
        return "the whole clip"
    anchor, frames = window
    return f"frames {list(frames)}" + (f" with anchor frame {anchor}" if anchor is not None and anchor >= 0 else "")
