"""Enhance-A-Video on every native ComfyUI video family, through ComfyUI's real loaders, model
patcher and KSampler, on tiny models (support/tiny_models.py, the families in support/families.py).

Per family: the loader builds the intended model class; the node changes sampling, is bit-identical
at weight 0 and leaves the input model untouched. For the families where the scale does not land
on a plain [batch, video tokens, channels] projection output (joint attention with text, Mochi's
norm after the projection, Cosmos 1.0's sequence-first output), the scale measured inside a real
sampling step is checked against the naive official formula at the point where it must act.

CogVideoX and Kandinsky 5 exist only in newer ComfyUI: their tests skip on a ComfyUI without them.
"""

import pytest
import torch

from freevideo.enhance_core.patching.attention_slot import add_attention_override
from freevideo.enhance_core.methods.enhance_a_video import apply_enhance_a_video
from freevideo.enhance_core.models import adapter_for
from support import tiny_models
from support.families import BY_ID, FAMILIES, FRAMES, TEXT_TOKENS, load, plain, sample
from support.reference import naive_scale

pytestmark = pytest.mark.families


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_loader_builds_the_intended_model_class(fam):
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils
    model = load(fam)
    assert type(model.model) is getattr(comfy.model_base, fam.model_base)
    if fam.loader is None:
        assert type(model.model.model_config) is getattr(comfy.supported_models, fam.config)
    else:
        # Built from a small config; ComfyUI's detection still reads the file as this family.
        sd = comfy.utils.load_torch_file(str(getattr(tiny_models, fam.file)()))
        assert type(comfy.model_detection.model_config_from_unet(sd, "")) is getattr(comfy.supported_models, fam.config)
    adapter = adapter_for(model)
    assert adapter.name == fam.adapter
    assert len(adapter.sites(model.get_model_object("diffusion_model"))) == fam.layers


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_changes_sampling_and_leaves_the_input_model_untouched(fam):
    model = load(fam)
    before = plain(fam)
    enhanced = sample(fam, apply_enhance_a_video(model, weight=40.0))
    after = sample(fam, model)
    assert torch.isfinite(enhanced).all()
    assert not torch.equal(before, enhanced)
    assert torch.equal(before, after)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_weight_zero_is_bit_identical(fam):
    assert torch.equal(sample(fam, apply_enhance_a_video(load(fam), weight=0.0)), plain(fam))


# --- The scale at the right point, on video tokens only --------------------------------------

class Recorder:
    """Kernel calls (q, k, unscaled output) made while one module runs, through an attention
    override installed below the node's (so it sees what the node's override passes on)."""

    def __init__(self, model, module):
        self.clone = model.clone()
        self.calls = []
        self._inside = False
        add_attention_override(self.clone, "test_recorder", self._record)
        self._handles = [module.register_forward_pre_hook(lambda m, a: setattr(self, "_inside", True)),
                         module.register_forward_hook(lambda m, a, o: setattr(self, "_inside", False))]

    def _record(self, call_next, q, k, v, heads, *args, **kwargs):
        out = call_next(q, k, v, heads, *args, **kwargs)
        if self._inside:
            # Clone: the node may scale the kernel output in place afterwards.
            self.calls.append((q, k, out.clone(), heads, kwargs))
        return out

    def hooks(self, *handles):
        self._handles.extend(handles)

    def remove(self):
        for h in self._handles:
            h.remove()


def one_step(fam, patched):
    sample(fam, patched, steps=1, cfg=3.0)


def bhld(t, heads, skip_reshape):
    """A kernel argument as [B, L, H, D]."""
    return t.transpose(1, 2) if skip_reshape else t.view(t.shape[0], t.shape[1], heads, -1)


def the_call(rec):
    assert len(rec.calls) == 1, "one self-attention kernel call per block and model call"
    q, k, out, heads, kwargs = rec.calls[0]
    assert q.shape[0] == 2, "cond and uncond should run as one batch of 2 here"
    skip = kwargs.get("skip_reshape", False)
    return bhld(q, heads, skip), bhld(k, heads, skip), out


def video_first(q_kernel, text_q):
    """Whether the joint sequence starts with the video tokens, from where the text queries are:
    text tokens sit at rope position 0, so the kernel's text queries are the block's normalised
    text queries exactly."""
    n = text_q.shape[1]
    first = torch.allclose(q_kernel[:, :n], text_q, atol=1e-6)
    last = torch.allclose(q_kernel[:, -n:], text_q, atol=1e-6)
    assert first != last, "the text queries should be found at exactly one end"
    return last


def tokens_per_frame(fam):
    """Video tokens per latent frame: spatial patch 2, except LTX-Video, LTX-2 and HunyuanVideo 1.5 (patch 1)."""
    return fam.size ** 2 if fam.id in ("ltxv", "ltx2", "hunyuan_video_15") else (fam.size // 2) ** 2


@pytest.fixture
def hunyuan():
    return BY_ID["hunyuan_video"], load(BY_ID["hunyuan_video"])


@pytest.mark.parametrize("fam_id", ["hunyuan_video", "hunyuan_video_15"])
def test_hunyuan_video_double_block_scales_the_image_projection(fam_id):
    fam = BY_ID[fam_id]
    model = load(fam)
    block = model.get_model_object("diffusion_model").double_blocks[1]
    rec = Recorder(model, block)
    text_qkv, proj_out, text_proj_out = [], [], []
    rec.hooks(block.txt_attn.qkv.register_forward_hook(lambda m, a, o: text_qkv.append(o)),
              block.img_attn.proj.register_forward_hook(lambda m, a, o: proj_out.append(o.clone())),
              block.txt_attn.proj.register_forward_hook(lambda m, a, o: text_proj_out.append(o.clone())))
    try:
        one_step(fam, apply_enhance_a_video(rec.clone, weight=6.0, layers="1"))
    finally:
        rec.remove()
    q, k, out = the_call(rec)
    heads = q.shape[2]
    raw = text_qkv[0]
    text_q = block.txt_attn.norm.query_norm(raw.view(raw.shape[0], raw.shape[1], 3, heads, -1)[:, :, 0])
    video = FRAMES * tokens_per_frame(fam)
    first = video_first(q, text_q)
    sl = slice(0, video) if first else slice(q.shape[1] - video, None)
    text = slice(video, None) if first else slice(0, q.shape[1] - video)
    want = naive_scale(q[:, sl], k[:, sl], FRAMES, 6.0)
    assert want.min() > 1.0 and not torch.equal(want[0], want[1])
    projected = torch.nn.functional.linear(out[:, sl], block.img_attn.proj.weight, block.img_attn.proj.bias)
    torch.testing.assert_close(proj_out[0], projected * want.view(-1, 1, 1), rtol=1e-5, atol=1e-6)
    # The text stream's projection gets the text tokens' attention output, unscaled.
    text_projected = torch.nn.functional.linear(out[:, text], block.txt_attn.proj.weight, block.txt_attn.proj.bias)
    torch.testing.assert_close(text_proj_out[0], text_projected, rtol=1e-6, atol=1e-7)


def test_hunyuan_video_single_block_scales_the_video_part_of_the_kernel_output(hunyuan):
    fam, model = hunyuan
    dm = model.get_model_object("diffusion_model")
    block = dm.single_blocks[0]
    rec = Recorder(model, block)
    last_double, linear2_in = [], []
    rec.hooks(dm.double_blocks[-1].register_forward_hook(lambda m, a, o: last_double.append(o[1].clone())),
              block.register_forward_pre_hook(lambda m, a: last_double.append(a[0].clone())),
              block.linear2.register_forward_pre_hook(lambda m, a: linear2_in.append(a[0].clone())))
    layer = len(dm.double_blocks)  # single blocks are numbered after the double blocks
    try:
        one_step(fam, apply_enhance_a_video(rec.clone, weight=6.0, layers=str(layer)))
    finally:
        rec.remove()
    q, k, out = the_call(rec)
    txt, x = last_double
    n_txt = txt.shape[1]
    text_at_end = torch.equal(x[:, -n_txt:], txt)
    assert text_at_end != torch.equal(x[:, :n_txt], txt)
    video = slice(0, x.shape[1] - n_txt) if text_at_end else slice(n_txt, None)
    text = slice(x.shape[1] - n_txt, None) if text_at_end else slice(0, n_txt)
    want = naive_scale(q[:, video], k[:, video], FRAMES, 6.0)
    assert want.min() > 1.0 and not torch.equal(want[0], want[1])
    attn_in = linear2_in[0][..., :dm.hidden_size]
    torch.testing.assert_close(attn_in[:, video], out[:, video] * want.view(-1, 1, 1), rtol=1e-5, atol=1e-6)
    assert torch.equal(attn_in[:, text], out[:, text])


def test_mochi_scale_lands_after_the_norm_that_follows_the_projection():
    """Mochi's block adds rms_norm(proj_x(attention)) * tanh(gate): a scale before that norm would
    cancel. The block output must equal the block recomputed with the official scale applied after
    the norm, on the video stream only."""
    import comfy.ldm.common_dit
    fam = BY_ID["mochi"]
    model = load(fam)
    block = model.get_model_object("diffusion_model").blocks[1]
    rec = Recorder(model, block)
    block_in, block_out = [], []
    rec.hooks(block.register_forward_pre_hook(lambda m, a: block_in.append(a)),
              block.register_forward_hook(lambda m, a, o: block_out.append(o)))
    try:
        one_step(fam, apply_enhance_a_video(rec.clone, weight=6.0, layers="1"))
    finally:
        rec.remove()
    q, k, out = the_call(rec)
    x, c, _ = block_in[0]
    n_video = x.shape[1]  # Mochi puts the video tokens first, the cropped text after
    want = naive_scale(q[:, :n_video], k[:, :n_video], FRAMES, 6.0)
    assert want.min() > 1.0 and not torch.equal(want[0], want[1])
    with torch.no_grad():
        _, gate_msa, scale_mlp, gate_mlp = block.mod_x(torch.nn.functional.silu(c)).chunk(4, dim=1)
        normed = comfy.ldm.common_dit.rms_norm(block.attn.proj_x(out[:, :n_video]), eps=1e-6)

        def block_with(scale):
            mid = x + normed * scale.view(-1, 1, 1) * torch.tanh(gate_msa).unsqueeze(1)
            return block.ff_block_x(mid, scale_mlp, gate_mlp)
    torch.testing.assert_close(block_out[0][0], block_with(want), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(block_out[0][0], block_with(torch.ones_like(want)), rtol=1e-5, atol=1e-5)


def layer1_scaling(fam, model, attn):
    """One sampling step with Enhance-A-Video (weight 6) on layer 1, whose attention module is
    `attn`: the kernel call's q and output, the module's outputs, and the naive official scale,
    which must exceed 1 and differ between cond and uncond (their input went through block 0's
    cross-attention)."""
    rec = Recorder(model, attn)
    outputs = []
    rec.hooks(attn.register_forward_hook(lambda m, a, o: outputs.append(o.clone())))
    try:
        one_step(fam, apply_enhance_a_video(rec.clone, weight=6.0, layers="1"))
    finally:
        rec.remove()
    q, k, out = the_call(rec)
    want = naive_scale(q, k, FRAMES, 6.0)
    assert want.min() > 1.0 and not torch.equal(want[0], want[1])
    return q, out, outputs, want


def test_cosmos1_scales_its_sequence_first_output_per_batch_element():
    from einops import rearrange
    fam = BY_ID["cosmos1"]
    model = load(fam)
    # Block 1: its input went through block 0's cross-attention, so cond and uncond differ.
    attn = model.get_model_object("diffusion_model").blocks["block1"].blocks[0].block.attn
    _, out, outputs, want = layer1_scaling(fam, model, attn)
    projected = attn.to_out(rearrange(out, "b n s c -> s b (n c)"))
    torch.testing.assert_close(outputs[0], projected * want.view(1, -1, 1), rtol=1e-5, atol=1e-6)


# Video self-attention only, output [batch, video tokens, channels] = projection(kernel output):
# (family, layer 1's attention module, its output projection).
PROJECTED = [
    ("wan22_ti2v_5b", "blocks.1.self_attn", "o"),
    ("ltxv", "transformer_blocks.1.attn1", "to_out"),
    ("ltx2", "transformer_blocks.1.attn1", "to_out"),  # the video stream's self-attention
    ("cosmos_predict2", "blocks.1.self_attn", "output_proj"),
    ("kandinsky5", "visual_transformer_blocks.1.self_attention", "out_layer"),
]


@pytest.mark.parametrize("fam_id,path,projection", PROJECTED, ids=[p[0] for p in PROJECTED])
def test_scale_multiplies_the_projected_self_attention_output(fam_id, path, projection):
    """Layer 1 of a real sampling step: the attention module's output (after its projection, before
    the block's gate and residual) is the projected kernel output times the naive official scale,
    one per batch element (cond and uncond differ: their input went through block 0's cross-attention)."""
    fam = BY_ID[fam_id]
    model = load(fam)
    attn = model.get_model_object(f"diffusion_model.{path}")
    q, out, outputs, want = layer1_scaling(fam, model, attn)
    assert q.shape[1] == FRAMES * tokens_per_frame(fam)
    assert len(outputs) == 1
    with torch.no_grad():
        projected = getattr(attn, projection)(out)
    torch.testing.assert_close(outputs[0], projected * want.view(-1, 1, 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], projected, rtol=1e-3, atol=1e-5)


def test_cogvideox_scales_only_the_video_part_of_the_joint_projection():
    fam = BY_ID["cogvideox"]
    model = load(fam)
    block = model.get_model_object("diffusion_model").blocks[1]
    rec = Recorder(model, block)
    outputs = []
    rec.hooks(block.attn_out.register_forward_hook(lambda m, a, o: outputs.append(o.clone())))
    try:
        one_step(fam, apply_enhance_a_video(rec.clone, weight=6.0, layers="1"))
    finally:
        rec.remove()
    q, k, out = the_call(rec)
    video = slice(TEXT_TOKENS, None)  # CogVideoX attends over text then video
    want = naive_scale(q[:, video], k[:, video], FRAMES, 6.0)
    assert want.min() > 1.0 and not torch.equal(want[0], want[1])
    projected = block.attn_out(out)
    torch.testing.assert_close(outputs[0][:, video], projected[:, video] * want.view(-1, 1, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[0][:, :TEXT_TOKENS], projected[:, :TEXT_TOKENS], rtol=0, atol=0)
