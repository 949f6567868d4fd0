"""The ComfyUI node API the nodes are written against, in one place.

Pinned to the newest versioned module that ComfyUI 0.3.75 and 0.33 both ship (`comfy_api.v0_0_2`);
`comfy_api.latest` is ComfyUI's in-development API and may change under us. A ComfyUI without the
versioned module falls back to `latest`.
"""

import inspect

try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:
    from comfy_api.latest import ComfyExtension, io

_WIDGETS = (io.Boolean, io.Combo, io.Float, io.Int, io.String)

# Keyword arguments for an expert input: newer ComfyUIs fold inputs marked advanced away behind a
# toggle; older ones have no such parameter (0.3.75 rejects it), so there every input stays visible.
EXPERT = {"advanced": True} if all(
    "advanced" in inspect.signature(widget.Input.__init__).parameters for widget in _WIDGETS) else {}

__all__ = ["EXPERT", "ComfyExtension", "io"]
