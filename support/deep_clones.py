"""Multi-GPU deep clones on a CPU machine, for the tests of every node: clones of a patched model
as ComfyUI's MultiGPU_WorkUnits makes them, and model calls run concurrently in threads as its
thread pool runs work units."""

import threading

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
from support import tiny_models


def needs_deep_clones():
    if not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"):
        pytest.skip("this ComfyUI has no multi-GPU deep clones (ModelPatcher.deepclone_multigpu, added after 0.3.75)")


def two_cpu_devices_work_units(monkeypatch):
    """ComfyUI's MultiGPU_WorkUnits node class with two CPU devices standing in for two GPUs ("cpu"
    and "cpu:0" compare unequal, so ComfyUI makes a deep clone for the second and runs its work
    units in a worker thread); skips where this ComfyUI has no deep clones or no such node."""
    needs_deep_clones()
    try:
        from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    except ImportError:
        pytest.skip("this ComfyUI has no MultiGPU_WorkUnits node (comfy_extras/nodes_multigpu.py)")
    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices",
                        lambda exclude_current=False: [torch.device("cpu"), torch.device("cpu", 0)])
    monkeypatch.setattr(comfy.model_management, "set_torch_device", lambda device: None)
    return MultiGPUCFGSplitNode


def fresh_wan():
    """Tiny Wan 2.1 from the core loader (deep clones reload the model through the loader that made it)."""
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())


def forget_released_patchers():
    """Drop ComfyUI's loaded-model entries whose patcher earlier tests released (its weak reference
    is dead while the shared model lives on): 0.33's MultiGPU node reads every entry's patcher and
    fails on such an entry, which a test process piles up faster than a server does."""
    loaded = comfy.model_management.current_loaded_models
    loaded[:] = [entry for entry in loaded if entry.model is not None]


def one_call(patcher, x, sigma, context):
    """One model call as a multi-GPU work unit makes it: apply_model with the patcher's wrappers."""
    options = dict(patcher.model_options.get("transformer_options", {}), cond_or_uncond=[0], sigmas=sigma,
                   wrappers=comfy.patcher_extension.copy_nested_dicts(patcher.wrappers))
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


def concurrent_calls_match_alone(patched, rounds: int = 6):
    """Two deep clones of `patched`, each called alone and then `rounds` times concurrently in two
    threads with different inputs: every concurrent result must equal that clone's result alone.
    Returns the results alone (for further checks)."""
    clones = [patched.deepclone_multigpu(new_load_device=torch.device("cpu")) for _ in range(2)]
    comfy.model_management.load_models_gpu(clones)
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(1, 16, 5, 16, 16, generator=g), torch.tensor([0.3 + 0.4 * i]),
               torch.randn(1, 8, 4096, generator=g)) for i in range(2)]
    alone = [one_call(c, *inp) for c, inp in zip(clones, inputs)]
    results = [[None] * rounds for _ in clones]
    start = threading.Barrier(len(clones))

    def work(i):
        start.wait()
        for r in range(rounds):
            results[i][r] = one_call(clones[i], *inputs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clones))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.equal(alone[0], alone[1])
    for i in range(len(clones)):
        for r in range(rounds):
            assert torch.equal(results[i][r], alone[i]), (i, r)
    return alone, inputs


def deep_clone_acts_on_its_own_weights(patch, sample, weight_effect: bool = True):
    """A deep clone of patch(fresh model): each hooked module holds the clone's own parameters, not
    the source model's; with weight_effect, a weight changed only on the clone shows in its sampled
    output exactly as the same patch on a model loaded with that weight."""
    patched = patch(fresh_wan())
    hooked = {path: obj for path, obj in patched.object_patches.items() if hasattr(obj, "_freevideo_arounds")}
    assert hooked
    deep = patched.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert deep.model is not patched.model
    for path, obj in hooked.items():
        module = comfy.utils.get_attr(deep.model, path)
        copy = deep.object_patches[path]
        # The whole module state (parameters, buffers, children, ComfyUI's flags) is the clone's own.
        assert copy.__dict__ is module.__dict__ and copy.__dict__ is not obj.__dict__, path
        own, mine = dict(module.named_parameters()), dict(copy.named_parameters())
        assert all(p is own[name] for name, p in mine.items()), path
        assert all(p is not dict(obj.named_parameters())[name] for name, p in mine.items()), path
    if not weight_effect:
        return
    weight = "diffusion_model.blocks.1.self_attn.o.weight"
    with torch.no_grad():
        comfy.utils.get_attr(deep.model, weight).mul_(1.5)
    reference = fresh_wan()
    with torch.no_grad():
        comfy.utils.get_attr(reference.model, weight).mul_(1.5)
    changed = sample(deep)
    assert torch.equal(changed, sample(patch(reference)))
    assert not torch.equal(changed, sample(patched))
