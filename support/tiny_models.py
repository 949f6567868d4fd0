"""Tiny, deterministic models built with ComfyUI's own classes, for tests, benchmarks and the demo.

Families whose size ComfyUI's loader infers from the weights are saved as safetensors with the real
key names and loaded through ComfyUI's own loader. Each file is generated on first use into the
cache folder (FREEVIDEO_MODEL_CACHE, default .runtime/tiny_models) and reused after.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FREEVIDEO_MODEL_CACHE", ROOT / ".runtime" / "tiny_models"))


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic weights that keep activations of a random transformer in a sane range:
    matrices ~ N(0, 1/fan_in), norm scales ~ 1, biases and modulation vectors small. Each tensor is
    seeded from its own name, so adding a parameter does not change the others."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(seed ^ int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf == "weight":
                fan_in = p[0].numel()
                value = noise / fan_in ** 0.5
            elif leaf in ("weight", "scale", "gamma") and ("norm" in name or p.ndim == 1):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


def partial_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place: a name of this process's own, as parallel
    test workers may build the same cached file at once."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    """Write a safetensors file into the cache: under this process's own partial name, then renamed
    into place, so another process never reads it half written."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _save(module: torch.nn.Module, path: Path, prefix: str = "", metadata: dict | None = None) -> Path:
    return save_tensors({prefix + k: v for k, v in module.state_dict().items()}, path, metadata)


def _cached(name: str, build, seed: int = 0, fix=None, config: dict | None = None) -> Path:
    """The cached file `name`, built, initialised (and adjusted by `fix`) on first use; `config`
    goes into the file's "config" metadata, where ComfyUI reads some models' variant from."""
    path = CACHE / name
    if not path.exists():
        module = build()
        init_weights(module, seed=seed)
        if fix is not None:
            with torch.no_grad():
                fix(module)
        _save(module, path, metadata=None if config is None else {"config": json.dumps(config)})
    return path


def wan21_t2v() -> Path:
    """Wan 2.1 T2V layout, 4 blocks of dim 256 (ComfyUI infers 2 heads of 128)."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256,
                        text_dim=4096, out_dim=16, num_heads=2, num_layers=4, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_wan21_t2v.safetensors", build)


def load_diffusion_model(path: Path):
    """Load through ComfyUI's own loader (what the UNETLoader node calls)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def wan21_vae(seed: int = 0) -> Path:
    """Wan 2.1 VAE layout with base width 8 (ComfyUI infers it from decoder.head.0.gamma): 16 latent
    channels, 8x spatial and 4x causal temporal compression. Another seed gives another VAE of the
    same architecture (Qwen-Image's VAE is one)."""
    def build():
        from comfy.ldm.wan.vae import WanVAE
        return WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
    return _cached("tiny_wan21_vae.safetensors" if seed == 0 else f"tiny_wan21_vae_s{seed}.safetensors", build, seed=seed)


def load_vae(path: Path):
    """Load through ComfyUI's own VAE loader (what the VAELoader node calls)."""
    import comfy.sd
    import comfy.utils
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


# --- One tiny model per native video family (Enhance-A-Video family tests) ---------------------
# Sizes are the smallest that ComfyUI's detection maps back to the same configuration (head widths
# it hard-codes: Wan, HunyuanVideo 128; LTX-Video 32 heads; Cosmos-Predict2 16 heads and 10 blocks
# for widths other than 2048/5120). Mochi and Cosmos 1.0 have full-size configs hard-coded in the
# detection: they are built from a small config with ComfyUI's own supported_models/model_base
# classes (`patcher_from_config`); their files still carry the real key names.


def wan22_ti2v_5b() -> Path:
    """Wan 2.2 TI2V 5B layout: 48-channel latent in and out (ComfyUI picks WAN22_T2V from out_dim 48)."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=48, dim=256, ffn_dim=512, freq_dim=256,
                        text_dim=4096, out_dim=48, num_heads=2, num_layers=2, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_wan22_ti2v_5b.safetensors", build)


def _hunyuan_video(**config):
    import dataclasses
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams
    base = dict(theta=256, mlp_ratio=4.0, qkv_bias=True, axes_dim=[16, 56, 56], meanflow=False, byt5=False,
                use_cond_type_embedding=False, vision_in_dim=None, hidden_size=256, num_heads=2)
    base.update(config)
    if "meanflow_sum" in {f.name for f in dataclasses.fields(HunyuanVideoParams)}:
        base.setdefault("meanflow_sum", False)  # a field newer ComfyUI added
    return HunyuanVideo(**base, operations=comfy.ops.disable_weight_init)


def hunyuan_video_t2v() -> Path:
    """HunyuanVideo 1.0 T2V layout: 2 double + 2 single blocks of width 256 (2 heads of 128, what
    ComfyUI infers), CLIP-L pooled vector, guidance embedding, 4096-wide LLaVA text features."""
    def build():
        return _hunyuan_video(in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
                              context_in_dim=4096, depth=2, depth_single_blocks=2, guidance_embed=True)
    return _cached("tiny_hunyuan_video_t2v.safetensors", build)


def hunyuan_video_15() -> Path:
    """HunyuanVideo 1.5 layout: 32-channel latent, patch 1, image condition channels (65 in),
    vision projection from 1152 (what selects HunyuanVideo15), double blocks only, Qwen 3584 text."""
    def build():
        return _hunyuan_video(in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
                              context_in_dim=3584, depth=2, depth_single_blocks=0, guidance_embed=False,
                              use_cond_type_embedding=True, vision_in_dim=1152)
    return _cached("tiny_hunyuan_video_15.safetensors", build)


def ltxv() -> Path:
    """LTX-Video layout: 2 blocks, 32 heads of 8 (ComfyUI infers the head width with 32 heads)."""
    def build():
        import comfy.ops
        from comfy.ldm.lightricks.model import LTXVModel
        return LTXVModel(in_channels=128, cross_attention_dim=256, attention_head_dim=8, num_attention_heads=32,
                         caption_channels=4096, num_layers=2, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_ltxv.safetensors", build)


def cosmos_predict2() -> Path:
    """Cosmos-Predict2 T2V layout: width 256; ComfyUI then uses its defaults of 10 blocks, 16 heads."""
    def build():
        import comfy.ops
        from comfy.ldm.cosmos.predict2 import MiniTrainDIT
        return MiniTrainDIT(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
                            patch_spatial=2, patch_temporal=1, model_channels=256, num_blocks=10, num_heads=16,
                            crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True,
                            use_adaln_lora=True, adaln_lora_dim=256, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_cosmos_predict2.safetensors", build)


# Small configs for the families whose detection hard-codes the full size. The keys ComfyUI's
# supported_models class needs to match ("image_model", in_channels) are kept.
MOCHI_CONFIG = dict(
    image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=128, hidden_size_y=64,
    # The block asserts an MLP width of 1536 * 8: 128 * 96.
    mlp_ratio_x=96.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
    out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True,
    attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=256, t5_token_length=256,
    rope_theta=10000.0)

COSMOS1_CONFIG = dict(
    image_model="cosmos", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
    patch_spatial=2, patch_temporal=1, model_channels=256, num_blocks=2, num_heads=2, block_config="FA-CA-MLP",
    concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
    block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=256,
    extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable", crossattn_emb_channels=1024,
    rope_t_extrapolation_ratio=2.0)


def mochi() -> Path:
    """Mochi: 2 joint blocks, visual width 128 (2 heads of 64), text width 64, T5 features of 256."""
    def build():
        import comfy.ops
        from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmDiTJoint
        return AsymmDiTJoint(**MOCHI_CONFIG, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_mochi.safetensors", build)


def cosmos1() -> Path:
    """Cosmos 1.0 T2V: 2 blocks (full attention, cross-attention, MLP) of width 256, 2 heads."""
    def build():
        import comfy.ops
        from comfy.ldm.cosmos.model import GeneralDIT
        return GeneralDIT(**COSMOS1_CONFIG, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_cosmos1.safetensors", build)


def patcher_from_config(config_class, unet_config: dict, path: Path):
    """What comfy.sd.load_diffusion_model does after detection, with a given config: ComfyUI's
    supported_models class builds its model_base model, the file's weights go in (every key, no
    extra), and the result is wrapped in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    config = config_class(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(str(path)), strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_mochi():
    import comfy.supported_models
    return patcher_from_config(comfy.supported_models.GenmoMochi, MOCHI_CONFIG, mochi())


def load_cosmos1():
    import comfy.supported_models
    return patcher_from_config(comfy.supported_models.CosmosT2V, COSMOS1_CONFIG, cosmos1())


def cogvideox() -> Path:
    """CogVideoX 1.0 layout with rotary positions (5B style): 2 blocks, 2 heads of 64 (ComfyUI
    infers 64-wide heads), T5 text of 4096. Newer ComfyUI only."""
    def build():
        import comfy.ops
        from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
        return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                                           time_embed_dim=128, text_embed_dim=4096, num_layers=2, patch_size=2,
                                           use_rotary_positional_embeddings=True, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_cogvideox.safetensors", build)


def kandinsky5() -> Path:
    """Kandinsky 5 video layout: width 128 (2 heads of 64 from the default rope axes), 1 text and
    2 visual blocks, Qwen 3584 text and CLIP 768 pooled. Newer ComfyUI only."""
    def build():
        import comfy.ops
        from comfy.ldm.kandinsky5.model import Kandinsky5
        return Kandinsky5(in_visual_dim=16, out_visual_dim=16, time_dim=64, model_dim=128, ff_dim=256,
                          visual_embed_dim=132, num_text_blocks=1, num_visual_blocks=2,
                          operations=comfy.ops.disable_weight_init)
    return _cached("tiny_kandinsky5.safetensors", build)


def minimax_h3() -> Path:
    """MiniMax H3 layout: 2 DiT blocks and 1 token-refiner block of width 256 (2 heads of 128, what
    ComfyUI infers from q_norm and qkv_proj), 24-channel video and 32-channel audio latents, text
    features of 512 (the real model's Qwen3-VL states are 5120 wide). Newer ComfyUI only."""
    def build():
        import comfy.ops
        from comfy.ldm.minimax.model import MiniMaxH3Model
        return MiniMaxH3Model(hidden_size=256, num_layers=2, token_refiner_num_layers=1, num_attention_heads=2,
                              attention_head_dim=128, ffn_hidden_size=512, text_dim=512, timestep_input_dim=256,
                              time_embed_hidden_size=256, time_embed_dim=128, operations=comfy.ops.disable_weight_init)

    def fix(model):
        # rope.inv_freq is a buffer (init_weights sets parameters only): the usual geometric frequencies.
        n = model.rope.inv_freq.shape[0]
        model.rope.inv_freq.copy_(1.0 / 256.0 ** (torch.arange(n, dtype=torch.float32) / n))
    return _cached("tiny_minimax_h3.safetensors", build, fix=fix)


# LTX-2's sizes come from the checkpoint's "config" metadata, as in the released files; ComfyUI's
# detection reads the block count, the video head width (32 heads) and the text width from the weights.
LTX2_CONFIG = dict(in_channels=128, audio_in_channels=128, cross_attention_dim=256, attention_head_dim=8,
                   num_attention_heads=32, audio_cross_attention_dim=64, audio_attention_head_dim=16,
                   audio_num_attention_heads=4, caption_channels=64, num_layers=2, connector_attention_head_dim=16,
                   connector_num_attention_heads=4, connector_num_layers=1)


def ltx2() -> Path:
    """LTX-2 audio-video layout (LTXAVModel): 2 blocks, video 32 heads of 8, audio 4 heads of 16,
    text features of 2 x 64 (video and audio halves, as the model's own text connectors give them).
    Newer ComfyUI only."""
    def build():
        import comfy.ops
        from comfy.ldm.lightricks.av_model import LTXAVModel
        return LTXAVModel(**LTX2_CONFIG, operations=comfy.ops.disable_weight_init)
    return _cached("tiny_ltx2.safetensors", build, config={"transformer": LTX2_CONFIG})


# --- Models the video methods refuse: the backbone of a supported family, another model -------


def wan21_causal_ar() -> Path:
    """Autoregressive Wan 2.1 (CausalWanModel, Causal Forcing): the tiny Wan 2.1 T2V weights (the
    real model's are Wan 2.1's too) with the "config" metadata its released files carry, which is
    what makes ComfyUI's loader pick WAN21_CausalAR_T2V. Newer ComfyUI only."""
    from safetensors.torch import load_file
    path = CACHE / "tiny_wan21_causal_ar.safetensors"
    if not path.exists():
        save_tensors(load_file(str(wan21_t2v())), path, {"config": json.dumps({"transformer": {"causal_ar": True}})})
    return path


def load_anima_on_meta():
    """The Anima image model (comfy/ldm/anima, a Cosmos-Predict2 backbone with a text adapter) as
    ComfyUI's detection and model classes build it, on the meta device: no weights. Its text
    adapter has a fixed size (157M parameters with a width-256 backbone), too large for a test
    file, and refusing the model needs only its class. Newer ComfyUI only."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.anima.model import Anima
    with torch.device("meta"):
        layout = Anima(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
                       patch_temporal=1, model_channels=256, num_blocks=10, num_heads=16, crossattn_emb_channels=1024,
                       pos_emb_cls="rope3d", pos_emb_learnable=True, use_adaln_lora=True, adaln_lora_dim=256,
                       operations=comfy.ops.disable_weight_init).state_dict()
    config = comfy.model_detection.model_config_from_unet(layout, "")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(layout, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def bench_wan(dim: int = 256, layers: int = 6, ffn: int = 1024):
    """A Wan 2.1 T2V with random weights, `layers` blocks of width `dim` (heads of 128), loaded: by
    default the benchmarks' model, big enough for attention to cost what it costs in real use; the
    compile tests take a 2-block one."""
    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel
        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=dim, ffn_dim=ffn, freq_dim=256, text_dim=4096,
                        out_dim=16, num_heads=dim // 128, num_layers=layers, operations=comfy.ops.disable_weight_init)
    return load_diffusion_model(_cached(f"bench_wan_d{dim}_l{layers}_f{ffn}.safetensors", build))
