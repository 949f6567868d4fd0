"""ComfyUI-FreeVideo: training-free video enhancement nodes for ComfyUI's native video models."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
