"""State that lives for one sampling run, in a holder made when the run starts.

A method object holds only its settings; what a run accumulates (the registered layers, the
source trajectory, entropy sums) lives in the holder, which ComfyUI's per-call transformer_options
carry by reference to every model call, calc-cond-batch function and post-CFG function of the run.
Nothing outlives the run, and two samplers using one patched model never share it.
"""

import comfy.patcher_extension


class RunState:
    """Base of a method's per-run holder. Copies of the run's options (ComfyUI copies model_options
    freely) share the one holder: it is the run's, not a value."""

    def __deepcopy__(self, memo):
        return self


def per_run_state(clone, key: str, make) -> None:
    """At the start of every sampling run of `clone`, make(guider, noise, latent_image, sampler,
    sigmas, ...) builds the run's holder, reachable as run_state(options, key) until the run ends."""
    name = _name(key)

    def start(executor, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        options[name] = make(guider, *args, **kwargs)
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(name, None)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, start)


def run_state(options: dict | None, key: str):
    """The running sampling run's holder from a call's model_options or transformer_options; None
    outside a run (a model called without a sampler)."""
    if not options:
        return None
    name = _name(key)
    if name in options:
        return options[name]
    return (options.get("transformer_options") or {}).get(name)


def _name(key: str) -> str:
    # Beside the method's other per-call entries under its own key (a branch plan).
    return f"{key}/run"
