"""The ComfyUI node API the nodes are written against, in one place.

Pinned to the newest versioned module that ComfyUI 0.3.75 and 0.33 both ship (`comfy_api.v0_0_2`);
`comfy_api.latest` is ComfyUI's in-development API and may change under us. A ComfyUI without the
versioned module falls back to `latest`.
"""

try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:
    from comfy_api.latest import ComfyExtension, io

__all__ = ["ComfyExtension", "io"]
