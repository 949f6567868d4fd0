"""Hooks that must not depend on a norm module running: newer ComfyUI fuses norms into kernels.

ComfyUI after 0.33 forms a block's attention input with comfy_kitchen's fused `adaln` kernel,
applied to the block's input, instead of calling the norm module: HunyuanVideo's modulated norm
whenever it has no modulation dims, Wan's block on CUDA for large tensors (read in the 0.36 and 0.38
sources). 0.33 already fuses the q norm with the rotary embedding in other families (Cosmos-Predict2,
MiniMax), where the q-norm module then never runs.

Each test makes the block take the fused path, as the newer code does: while the block runs, the
norm module is swapped for a stand-in that calls the fused kernel on what it is given (the block's
input), so the module itself (and any hook on it) never runs. comfy_kitchen's own op where the
runtime has it (0.33), else a stand-in op registered under the same name (0.3.75). The results
must equal the unfused path's (whose values the method tests check against the reference rules),
differ from plain sampling, and, for feature accumulation, the fused kernel must get exactly
g * mean(cache) + (1 - g) * h.
"""

import contextlib

import pytest
import torch

from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.methods.feature_accumulation import apply_feature_accumulation
from support import families, tiny_models
from support.sampling import ksample, text_conditioning, video_latent


def _adaln():
    """comfy_kitchen's fused adaln op: layer_norm(x) * (1 + scale) + shift."""
    try:
        import comfy_kitchen  # noqa: F401  (registers torch.ops.comfy_kitchen)
    except ImportError:
        pass
    if not hasattr(torch.ops.comfy_kitchen, "adaln"):
        @torch.library.custom_op("comfy_kitchen::adaln", mutates_args=())
        def adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
            return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift
    return torch.ops.comfy_kitchen.adaln


class _FusedLayerNorm(torch.nn.Module):
    """Where a LayerNorm module was: the fused adaln kernel on the same input (no modulation here;
    the block applies its own after). `seen` records what the kernel returned."""

    def __init__(self, eps, seen):
        super().__init__()
        self.eps, self.seen = eps, seen

    def forward(self, x):
        zero = torch.zeros((), dtype=x.dtype)
        out = _adaln()(x, zero, zero, self.eps)
        self.seen.append(out.detach().clone())
        return out


class _FusedRMSNorm(torch.nn.Module):
    """Where Wan's q-norm module was: the norm as a function, as a fused rms + rope kernel applies it."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)


@contextlib.contextmanager
def fused(monkeypatch, block_class, child: str, stand_in):
    """While a `block_class` block runs, its `child` module is replaced by stand_in(module): the
    module (a hooked copy of it included) does not run."""
    original = block_class.forward

    def forward(self, *args, **kwargs):
        module = self._modules[child]
        self._modules[child] = stand_in(getattr(module, "_freevideo_original", module))
        try:
            return original(self, *args, **kwargs)
        finally:
            self._modules[child] = module
    with monkeypatch.context() as m:
        m.setattr(block_class, "forward", forward)
        yield


def _wan21():
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())


def _sample_wan(model):
    return ksample(model, video_latent(frames=3, height=8, width=8), text_conditioning(seed=1), text_conditioning(seed=2),
                   steps=2, cfg=3.0)


def test_adaln_stand_in_is_the_module_path():
    """The fused path the tests build computes what the module path does (checks the stand-in)."""
    x, seen = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)), []
    norm = torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)
    torch.testing.assert_close(_FusedLayerNorm(1e-6, seen)(x), norm(x))
    assert torch.equal(seen[0], norm(x))


# --- feature accumulation's "attention input" mode ----------------------------------------------

def _block_classes():
    from comfy.ldm.cosmos.predict2 import Block as CosmosBlock
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock
    from comfy.ldm.wan.model import WanAttentionBlock
    return {"wan": [(WanAttentionBlock, "norm1")],
            "hunyuan_video": [(DoubleStreamBlock, "img_norm1"), (SingleStreamBlock, "pre_norm")],
            "cosmos_predict2": [(CosmosBlock, "layer_norm_self_attn")]}


def _load(case):
    if case == "wan":  # 4 blocks: layers 2 and 3 average more than the previous output
        return _wan21(), _sample_wan
    fam = families.BY_ID[case]
    return families.load(fam), lambda model: families.sample(fam, model)


@pytest.mark.parametrize("case", ["wan", "hunyuan_video", "cosmos_predict2"])
def test_feature_accumulation_mixes_the_input_of_a_fused_norm(monkeypatch, case):
    model, sample = _load(case)
    patched = apply_feature_accumulation(model, gate="0.5", group_size=6, mode="attention input")
    unfused = sample(patched)
    seen = []
    with contextlib.ExitStack() as stack:
        for block_class, child in _block_classes()[case]:
            stack.enter_context(fused(monkeypatch, block_class, child, lambda norm: _FusedLayerNorm(norm.eps, seen)))
        plain = sample(model)
        n_plain = len(seen)
        got = sample(patched)
    assert n_plain and len(seen) == 2 * n_plain  # the fused kernel, not the module, formed the inputs
    assert not torch.equal(got, plain), "feature accumulation changed nothing where the norm is fused"
    torch.testing.assert_close(got, unfused, rtol=1e-4, atol=1e-4)


def test_the_fused_kernel_gets_the_group_mean_mix_by_value(monkeypatch):
    """Wan, 4 blocks, gate 0.5: in every model call the kernel of block i normalises
    0.5 * mean(outputs of blocks 0..i-1) + 0.5 * h_i (block i's input, the previous output)."""
    from comfy.ldm.wan.model import WanAttentionBlock
    model = _wan21()
    patched = apply_feature_accumulation(model, gate="0.5", group_size=6, mode="attention input")
    dm = model.get_model_object("diffusion_model")
    seen, outputs = [], []
    handles = [block.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone())) for block in dm.blocks]
    try:
        with fused(monkeypatch, WanAttentionBlock, "norm1", lambda norm: _FusedLayerNorm(norm.eps, seen)):
            _sample_wan(patched)
    finally:
        for h in handles:
            h.remove()
    n = len(dm.blocks)
    norm = torch.nn.LayerNorm(dm.dim, eps=dm.blocks[0].norm1.eps, elementwise_affine=False)
    assert len(seen) == len(outputs) and len(seen) % n == 0
    for call in range(len(seen) // n):
        outs = outputs[call * n:(call + 1) * n]
        for i in range(2, n):
            want = 0.5 * torch.stack(outs[:i]).mean(0) + 0.5 * outs[i - 1]
            torch.testing.assert_close(seen[call * n + i], norm(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[call * n + 1], norm(outs[0]))  # layer 1: the mean is its own input


# --- routing: Wan's self-attention layers are marked without its q-norm module -------------------

def test_enhance_a_video_acts_where_wan_fuses_its_q_norm(monkeypatch, caplog):
    from comfy.ldm.wan.model import WanSelfAttention
    model = _wan21()
    patched = apply_enhance_a_video(model, weight=40.0)
    unfused = _sample_wan(patched)
    with fused(monkeypatch, WanSelfAttention, "norm_q", _FusedRMSNorm):
        plain = _sample_wan(model)
        got = _sample_wan(patched)
    assert "cannot act on every layer" not in caplog.text
    assert not torch.equal(got, plain), "Enhance-A-Video changed nothing where the q norm is fused"
    torch.testing.assert_close(got, unfused, rtol=1e-4, atol=1e-4)
