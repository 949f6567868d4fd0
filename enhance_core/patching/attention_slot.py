"""ComfyUI's attention-override slot (`transformer_options["optimized_attention_override"]`), shared
by every method: each puts its override in the slot when the model is called, around whatever the
slot holds then.

The slot is filled by an APPLY_MODEL wrapper, not when the node runs: a node applied later that
overwrites the slot (ComfyUI's attention-backend node, other packs' Sage/flash patches) is then
wrapped too, whatever the order of the graph.
"""

import functools

import torch

import comfy.patcher_extension

OVERRIDE_KEY = "optimized_attention_override"
# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
# skip_output_reshape=False, ...): the optional arguments in their positional order.
KERNEL_OPTIONAL_ARGS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")
# BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...): the
# position of transformer_options after x, as APPLY_MODEL wrappers receive it (both versions).
_APPLY_MODEL_OPTIONS_ARG = 4


def apply_model_options(args, kwargs) -> dict:
    """The per-call transformer_options an APPLY_MODEL wrapper receives (the arguments after x)."""
    return kwargs["transformer_options"] if "transformer_options" in kwargs else args[_APPLY_MODEL_OPTIONS_ARG]


def eager(fn, recursive: bool = True):
    """`fn` run by Python even inside a torch.compile'd model (TorchCompileModel): our hooks read
    per-call state that compiled code would guard on (and recompile for) or cannot trace. A graph
    break at each hook; with recursive=False what `fn` calls is compiled again."""
    return torch.compiler.disable(fn, recursive=recursive)


def calls_kernel(call_next) -> bool:
    """Whether an override's call_next is the attention kernel itself, not another override (which
    may keep per-call state shaped like the whole batch)."""
    return not isinstance(call_next, functools.partial)


def add_attention_override(model_patcher, key: str, handler):
    """Route every attention kernel call of `model_patcher` through
    handler(call_next, q, k, v, heads, **kwargs).

    `call_next` runs whatever the call's override slot held when the model was called (another
    pack's or ComfyUI's attention function, another of our nodes), else the attention ComfyUI
    chose: the slot holds one function, so the previous one is wrapped, never dropped.
    """
    chained = {}  # previous override -> our override around it; one stable function per
                  # neighbour, so torch.compile's guards see the same object at every call

    def chain(previous):
        if previous not in chained:
            if previous is None:
                def override(func, *args, **kwargs):
                    return handler(func, *args, **kwargs)
            else:
                def override(func, *args, **kwargs):
                    return handler(functools.partial(previous, func), *args, **kwargs)
            chained[previous] = eager(override)
        return chained[previous]

    def install(executor, x, *args, **kwargs):
        options = apply_model_options(args, kwargs)
        previous = options.get(OVERRIDE_KEY)
        options[OVERRIDE_KEY] = chain(previous)
        try:
            return executor(x, *args, **kwargs)
        finally:
            if previous is None:
                options.pop(OVERRIDE_KEY, None)
            else:
                options[OVERRIDE_KEY] = previous

    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, install)
