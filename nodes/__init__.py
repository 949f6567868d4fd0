"""Thin node classes: schema (inputs, tooltips, defaults) and a call into enhance_core."""

from ._api import ComfyExtension, io

from .attention_inspector import AttentionInspector
from .enhance_a_video import EnhanceAVideo
from .entropy_editing import EntropyEditing
from .entropy_guidance import EntropyGuidance
from .evs_sampler import EVSSampler
from .feature_accumulation import FeatureAccumulation

NODES = [EnhanceAVideo, EVSSampler, EntropyGuidance, EntropyEditing, AttentionInspector, FeatureAccumulation]


class FreeVideoExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FreeVideoExtension:
    return FreeVideoExtension()
