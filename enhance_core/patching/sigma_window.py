"""The part of the sampling run a method is active in, from ComfyUI's start/end percent."""

import comfy.patcher_extension


class SigmaWindow:
    def __init__(self, model_patcher, start_percent: float, end_percent: float):
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1")
        self.percents = (start_percent, end_percent)
        self._bounds(model_patcher)

    def _bounds(self, model_patcher) -> None:
        sampling = model_patcher.get_model_object("model_sampling")
        self.sigma_start = float(sampling.percent_to_sigma(self.percents[0]))
        self.sigma_end = float(sampling.percent_to_sigma(self.percents[1]))
        self._last = (None, True)

    def follow(self, clone) -> None:
        """Take the bounds from the model being sampled at the start of every sampling run, so a
        model-sampling patch applied after the node (ModelSamplingSD3's shift) moves the window."""
        window = self

        def refresh(executor, *args, **kwargs):
            window._bounds(executor.class_obj.model_patcher)
            return executor(*args, **kwargs)
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, f"freevideo_window_{id(self)}", refresh)

    def contains(self, transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        # Every layer of one model call sees the same sigmas tensor: read it (a device sync on
        # GPUs) once per call, not once per layer.
        if self._last[0] is not sigmas:
            sigma = float(sigmas.max())
            self._last = (sigmas, self.sigma_end <= sigma <= self.sigma_start)
        return self._last[1]
