"""Test-only nodes and routes for tests/test_robustness.py (installed only into test servers).

- FreeVideoTestProbe: MODEL in, a clone out whose every model call is counted; optionally it pauses
  at a given call until the server is interrupted (POST /interrupt), so a test interrupts sampling
  at a known point instead of racing a timer.
- FreeVideoTestLowPrecisionUNETLoader: ComfyUI's own diffusion-model loader with fp16 or bf16
  weights that also computes in that dtype on the CPU (ComfyUI would upcast to float32 there), as it
  does on a GPU.
- FreeVideoTestTinyImageModel: the tiny SD1.5-layout UNet of support/tiny_image_models.py (its small
  config is not one ComfyUI's detection maps back, so it has no file loader).
- Routes: GET /freevideo_test/state (model calls since the last reset, whether a probe is paused),
  POST /freevideo_test/reset, GET /freevideo_test/stats (process RSS and counts of what the loaded
  models carry: object patches, wrappers, callbacks, torch hooks, live patchers and tensors).
"""

import gc
import sys
import threading
import time
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths

ROOT = Path(__file__).resolve().parents[2]

# ComfyUI and the packs imported before this module leave some 400,000 long-lived objects. Frozen,
# they are left out of every later full collection (stats() runs one per call; ComfyUI one before
# each model load while it suspects a leak) and out of gc.get_objects(): 0.4 s less per stats call,
# and everything a prompt creates (patchers, models, tensors, hooks) is still counted.
gc.collect()
gc.freeze()

_lock = threading.Lock()
_state = {"model_calls": 0, "waiting": False}


class TestProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoTestProbe",
            category="FreeVideo/testing",
            description="Counts the model calls of a clone of the model; can pause at one call until the server is interrupted.",
            inputs=[
                io.Model.Input("model", tooltip="Model to observe (cloned)."),
                io.Int.Input("nonce", default=0, min=0, max=1 << 30,
                             tooltip="Changes the node's inputs, so ComfyUI re-runs it and everything after it."),
                io.Int.Input("pause_at_call", default=0, min=0, max=1 << 30,
                             tooltip="Model call (counted since the last /freevideo_test/reset, from 1) at which to wait "
                                     "for an interrupt; 0 never waits."),
                io.Boolean.Input("raise_inside", default=False,
                                 tooltip="After the interrupt arrives, raise ComfyUI's interrupt exception inside the "
                                         "step (before the model call) instead of letting the sampler stop at the step's end."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, nonce, pause_at_call, raise_inside) -> io.NodeOutput:
        m = model.clone()

        def probe(executor, *args, **kwargs):
            with _lock:
                _state["model_calls"] += 1
                n = _state["model_calls"]
            if pause_at_call and n == pause_at_call:
                _state["waiting"] = True
                try:
                    deadline = time.time() + 120
                    while not comfy.model_management.processing_interrupted() and time.time() < deadline:
                        time.sleep(0.01)
                finally:
                    _state["waiting"] = False
                if raise_inside:
                    comfy.model_management.throw_exception_if_processing_interrupted()
            return executor(*args, **kwargs)

        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "freevideo_test_probe", probe)
        return io.NodeOutput(m)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TestLowPrecisionUNETLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoTestLowPrecisionUNETLoader",
            category="FreeVideo/testing",
            description="ComfyUI's diffusion-model loader with fp16/bf16 weights that also computes in that dtype on the CPU.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A file in models/diffusion_models."),
                io.Combo.Input("dtype", options=list(DTYPES), tooltip="Weight and compute dtype."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, dtype) -> io.NodeOutput:
        import comfy.sd
        dt = DTYPES[dtype]
        model = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name),
                                              model_options={"dtype": dt})
        # On the CPU ComfyUI stores the weights in dt but upcasts every call to float32 (manual cast);
        # casting the inputs to dt instead runs the whole model in dt, as a GPU does.
        model.model.manual_cast_dtype = dt
        return io.NodeOutput(model)


class TestTinyImageModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoTestTinyImageModel",
            category="FreeVideo/testing",
            description="The tiny SD1.5-layout UNet of the tests (an image model, not a video model).",
            inputs=[io.Combo.Input("kind", options=["sd15"], tooltip="Which tiny image model.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, kind) -> io.NodeOutput:
        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))  # appended: the root's nodes/ must not shadow ComfyUI's nodes.py
        from support import tiny_image_models
        return io.NodeOutput(tiny_image_models.sd15_unet())


def _hooked(module) -> bool:
    return any(c.__name__ == "_Hooked" for c in type(module).__mro__)


def _torch_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def stats() -> dict:
    import psutil
    gc.collect()
    objects = gc.get_objects()
    patchers = [o for o in objects if isinstance(o, comfy.model_patcher.ModelPatcher)]
    storages = {}
    tensors = 0
    for o in objects:
        if isinstance(o, torch.Tensor):
            tensors += 1
            try:
                s = o.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except Exception:
                pass

    def wrappers(p):
        return sum(len(fns) for per_type in p.wrappers.values() for fns in per_type.values())

    def callbacks(p):
        return sum(len(fns) for per_type in p.callbacks.values() for fns in per_type.values())

    loaded = []
    for lm in comfy.model_management.current_loaded_models:
        patcher = lm.model
        if patcher is None:
            continue
        base = patcher.model
        loaded.append({
            "object_patches_applied": len(patcher.object_patches_backup),
            "hooked_modules_in_model": sum(1 for m in base.modules() if _hooked(m)),
            "torch_hooks": _torch_hooks(base),
        })
    roots = [p for p in patchers if getattr(p, "parent", None) is None]
    return {
        "rss": psutil.Process().memory_info().rss,
        "patchers": len(patchers),
        "root_patchers": len(roots),
        "root_object_patches": sum(len(p.object_patches) for p in roots),
        "root_wrappers": sum(wrappers(p) for p in roots),
        "root_callbacks": sum(callbacks(p) for p in roots),
        "wrappers": sum(wrappers(p) for p in patchers),
        "callbacks": sum(callbacks(p) for p in patchers),
        "object_patches": sum(len(p.object_patches) for p in patchers),
        "hooked_modules_alive": sum(1 for o in objects if isinstance(o, torch.nn.Module) and _hooked(o)),
        "tensors": tensors,
        "tensor_bytes": sum(storages.values()),
        "loaded_models": loaded,
    }


def _register_routes():
    try:
        from aiohttp import web
        from server import PromptServer
        routes = PromptServer.instance.routes
    except Exception:  # imported outside a running server
        return

    @routes.get("/freevideo_test/state")
    async def state(request):
        return web.json_response(dict(_state))

    @routes.post("/freevideo_test/reset")
    async def reset(request):
        with _lock:
            _state["model_calls"] = 0
        return web.json_response(dict(_state))

    @routes.get("/freevideo_test/stats")
    async def get_stats(request):
        return web.json_response(stats())


_register_routes()

NODES = [TestProbe, TestLowPrecisionUNETLoader, TestTinyImageModel]
