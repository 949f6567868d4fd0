"""Test-only ComfyUI nodes, installed only into the servers the tests and the demo start.

Tiny models have no text encoder: this node stands in for CLIPLoader + CLIPTextEncode with seeded
random embeddings of the shape the model family expects."""

import hashlib

import torch
from comfy_api.latest import ComfyExtension, io


class TestTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoTestTextConditioning",
            category="FreeVideo/testing",
            description="Seeded random text embeddings for tiny test models (no text encoder).",
            inputs=[
                io.String.Input("text", default="", tooltip="Hashed into the seed, so different prompts give different embeddings."),
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Number of text tokens."),
                io.Int.Input("dim", default=4096, min=1, max=8192, tooltip="Embedding width (Wan: 4096)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, tokens, dim) -> io.NodeOutput:
        seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, tokens, dim, generator=g), {}]])


class TestNodes(ComfyExtension):
    async def get_node_list(self):
        from .robustness_nodes import NODES as ROBUSTNESS_NODES
        return [TestTextConditioning] + ROBUSTNESS_NODES


async def comfy_entrypoint():
    return TestNodes()
