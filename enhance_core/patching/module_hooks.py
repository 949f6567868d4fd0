"""Hooked copies of a clone's modules, installed as ComfyUI object patches.

Nothing here touches the model a user passed in: the copy goes on a clone as an object patch, and
ComfyUI restores the original when the clone is unloaded. The module to copy is the one the clone
itself would run (module_of), not whatever the shared model holds right now: another clone that
sampled and is still loaded leaves its own object patches applied in place.
"""

import functools

import comfy.patcher_extension
import comfy.utils

from .attention_slot import eager

PREFIX = "diffusion_model."


class _Hooked:
    """Marker base of the hooked module classes made by `hooked_copy`."""


def _hooked_forward(self, *args, **kwargs):
    call = functools.partial(type(self)._freevideo_base.forward, self)
    for around in type(self)._freevideo_arounds:
        call = functools.partial(around, call)
    return call(*args, **kwargs)


def hooked_copy(module, around):
    """A copy of `module` whose forward runs around(call_original, *args, **kwargs).

    The copy shares the module's whole instance state (its __dict__: parameters, buffers, children,
    and the per-module flags ComfyUI sets when it patches weights and casts for low VRAM), so weight
    patches and LoRAs that ComfyUI applies by module path reach the same tensors, and its record of
    which modules hold patched weights stays true whichever of the two sits in the model; module
    names do not change. Only the class differs: the hooks live on a class made for this copy.
    Hooking a hooked copy stacks: the newest runs outermost.
    """
    if isinstance(module, _Hooked):
        return _hooked(module._freevideo_original, module._freevideo_arounds + (around,))
    return _hooked(module, (around,))


def _hooked(original, arounds: tuple):
    base = type(original)
    cls = type(f"Hooked{base.__name__}", (_Hooked, base), {
        "forward": eager(_hooked_forward), "_freevideo_base": base, "_freevideo_original": original,
        "_freevideo_arounds": arounds})
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", original.__dict__)
    return new


def module_of(model_patcher, path: str) -> tuple[str, object]:
    """The module at `path` (relative to the diffusion model) as `model_patcher` runs it, and the
    object-patch key that reaches it.

    Walked one name at a time: at every step the clone's own object patch wins, then the original
    that another loaded clone's patch replaced (ComfyUI keeps it in the backup all clones share),
    then the live attribute. Where a neighbour's object patch on this clone wrapped a module and
    the next name is missing on the wrapper, a single child of the wrapper that has it (the wrapped
    original) is followed, and the key goes through that child. Raises ValueError naming the path
    where nothing holds the module."""
    key = PREFIX.rstrip(".")
    obj = _resolve(model_patcher, key, None)
    for name in path.split("."):
        if not hasattr(obj, name):
            inner = [child for child, module in obj.named_children() if hasattr(module, name)] \
                if hasattr(obj, "named_children") else []
            if len(inner) != 1:
                raise ValueError(f"{key[len(PREFIX):]} is a {type(obj).__name__} (another node replaced it) that has no "
                                 f"'{name}' and no single wrapped module with one")
            key = f"{key}.{inner[0]}"
            obj = _resolve(model_patcher, key, obj)
        key = f"{key}.{name}"
        obj = _resolve(model_patcher, key, obj)
    return key, obj


def _resolve(model_patcher, key: str, parent):
    if key in model_patcher.object_patches:
        return model_patcher.object_patches[key]
    if key in model_patcher.object_patches_backup:
        return model_patcher.object_patches_backup[key]
    if parent is None:
        return comfy.utils.get_attr(model_patcher.model, key)
    return getattr(parent, key.rsplit(".", 1)[1])


def hook_module(model_patcher, path: str, around) -> None:
    """Object-patch the module at `path` (relative to the diffusion model) of `model_patcher` with a
    hooked copy running around(call_original, *args, **kwargs); hooking a path twice stacks, and the
    copy is re-made on a multi-GPU deep clone's own module."""
    key, module = module_of(model_patcher, path)
    model_patcher.add_object_patch(key, hooked_copy(module, around))
    follow_deep_clones(model_patcher)


def _rehook_on_deep_clone(source, deep_clone) -> None:
    """ON_DEEPCLONE_MULTIGPU: the deep clone copied our object patches, which share the source
    model's parameters; re-make each on the deep clone's own (freshly loaded) module at that path."""
    for key, patch in list(deep_clone.object_patches.items()):
        if isinstance(patch, _Hooked):
            own = comfy.utils.get_attr(deep_clone.model, key)
            if isinstance(own, _Hooked):  # a reused deep clone whose patches are still applied
                own = own._freevideo_original
            if own is not patch._freevideo_original:
                deep_clone.object_patches[key] = _hooked(own, patch._freevideo_arounds)


def follow_deep_clones(model_patcher) -> None:
    # Only ComfyUI versions with multi-GPU deep clones have this callback; elsewhere nothing to do.
    event = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if event is not None and not model_patcher.get_all_callbacks(event):
        model_patcher.add_callback_with_key(event, "freevideo_rehook", _rehook_on_deep_clone)
