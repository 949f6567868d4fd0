"""Running ComfyUI node classes in a test process the way ComfyUI's executor calls them."""

import importlib

import pytest


def run_node(node_cls, **inputs):
    """Run a node class as ComfyUI's executor does: a V3 node (io.ComfyNode) through execute() with
    the schema's defaults for the inputs not given (ComfyUI versions add inputs), a V1 node through
    its FUNCTION. Returns the output tuple."""
    if hasattr(node_cls, "define_schema"):
        schema = node_cls.define_schema()
        ids = [i.id for i in schema.inputs]
        unknown = set(inputs) - set(ids)
        assert not unknown, f"{schema.node_id} has no input(s) {unknown}; it has {ids}"
        kwargs = {i.id: inputs[i.id] if i.id in inputs else i.default for i in schema.inputs
                  if i.id in inputs or getattr(i, "default", None) is not None}
        return tuple(node_cls.execute(**kwargs).result)
    return tuple(getattr(node_cls(), node_cls.FUNCTION)(**inputs))


def comfy_extra(module: str, name: str):
    """A node class of comfy_extras, or a skip naming what this ComfyUI lacks."""
    try:
        return getattr(importlib.import_module(f"comfy_extras.{module}"), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {name} node (comfy_extras/{module}.py)")
