"""Survives the user's graph, through ComfyUI's own server on tiny models.

- Isolation: the loaded model used patched and unpatched, in one prompt and in consecutive and
  queued prompts, gives each configuration exactly its result in a fresh server; 20 prompts grow
  neither the process nor what the loaded model carries.
- Interrupt: POST /interrupt while each node samples; the same prompt then runs normally and equals
  a fresh server's result.
- Precision: fp16 and bf16 models sample with every node without NaN/inf; softmax-saturating q, k
  and v keep the cross-frame intensity, the entropy and the guidance's maps finite and right.
- Bad input: one table of broken graphs, each refused with a message naming the input and what is
  allowed, before any model call; the server then serves the next prompt correctly.

Two servers per module: `server` runs the tests; `fresh` (started beside it, never interrupted or
fed bad input) computes each configuration's reference result, the first of them as its first prompt.
A test-only probe node (tests/comfy_test_nodes/robustness_nodes.py) counts model calls, pauses at a
chosen call until the interrupt arrives, and a test-only route reports RSS and patch counts.
"""

import copy
import json
import math
import re
import threading
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from support import tiny_models
from support.comfy_server import ComfyServer

WAN_DIM = 4096
STEPS = 3


# --- servers and prompts ---------------------------------------------------------------------

def _model_files():
    from support import tiny_image_models as T
    T.taesd_vae()  # builds the cached file
    return {"diffusion_models": [tiny_models.wan21_t2v()],
            "vae": [tiny_models.wan21_vae(), tiny_models.CACHE / "tiny_taesd_sd15.safetensors"]}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    models = _model_files()
    pair = [ComfyServer(tmp_path_factory.mktemp(name), models=models) for name in ("server", "fresh")]
    errors = []

    def start(s):
        try:
            s.start()
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=start, args=(s,)) for s in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pair
    finally:
        for s in pair:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


class References:
    """Each configuration's result in the fresh server, computed once (the plain one first)."""

    def __init__(self, fresh):
        self.fresh = fresh
        self.results = {}

    def __call__(self, key, prompt):
        if key not in self.results:
            self.results[key] = outputs(self.fresh, self.fresh.run(complete(self.fresh, prompt)))
        return self.results[key]


@pytest.fixture(scope="module")
def reference(servers):
    refs = References(servers[1])
    refs("plain", wan_prompt(None))  # the fresh server's first prompt
    return refs


_nonce = iter(range(1, 1 << 30))
_object_info = {}


def complete(server, prompt: dict) -> dict:
    """Fill every widget input a node of the prompt leaves out with its default from the server's
    /object_info (so the prompts follow the nodes' current schema)."""
    if server.url not in _object_info:
        _object_info[server.url] = server.get("/object_info")
    info = _object_info[server.url]
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if v is not None}
        spec = info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, declared in spec.get(section, {}).items():
                options = declared[1] if len(declared) > 1 else {}
                choices = declared[0] if isinstance(declared[0], list) else options.get("options")
                value = node["inputs"].get(name)
                if isinstance(value, str) and value.endswith("*") and choices:
                    # "prefix*": the combo option that starts with prefix (option labels change)
                    (node["inputs"][name],) = [o for o in choices if o.startswith(value[:-1])]
                if name in node["inputs"]:
                    continue
                if "default" in options:
                    node["inputs"][name] = options["default"]
                elif choices and section == "required":
                    node["inputs"][name] = choices[0]
    return prompt


def cond(text):
    return {"class_type": "FreeVideoTestTextConditioning", "inputs": {"text": text, "tokens": 8, "dim": WAN_DIM}}


def base_nodes(nonce=0, pause=0, raise_inside=False, frames=9, size=32):
    return {
        "load": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_models.wan21_t2v().name, "weight_dtype": "default"}},
        "probe": {"class_type": "FreeVideoTestProbe", "inputs": {"model": ["load", 0], "nonce": nonce, "pause_at_call": pause,
                                                                 "raise_inside": raise_inside}},
        "pos": cond("a red fox runs through snow"), "neg": cond("blurry"),
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": size, "height": size, "length": frames, "batch_size": 1}},
    }


def method_node(method: str, model, **settings):
    if method == "eav":
        return {"class_type": "FreeVideoEnhanceAVideo", "inputs": dict({"model": model, "weight": 4.0}, **settings)}
    if method == "ieg":
        return {"class_type": "FreeVideoEntropyGuidance", "inputs": dict({"model": model, "scale": 1.0}, **settings)}
    raise ValueError(method)


def add_sampler(prompt, name, model, latent=("latent", 0), seed=7):
    prompt[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent), "denoise": 1.0}}
    prompt[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0], "filename_prefix": name}}


def wan_prompt(method=None, nonce=0, pause=0, raise_inside=False, name="out", **settings):
    """Loader -> probe -> [method] -> KSampler -> SaveLatent."""
    p = base_nodes(nonce, pause, raise_inside)
    model = ("probe", 0)
    if method is not None:
        p["method"] = method_node(method, ["probe", 0], **settings)
        model = ("method", 0)
    add_sampler(p, name, model)
    return p


def inspector_prompt(nonce=0, pause=0, raise_inside=False):
    p = base_nodes(nonce, pause, raise_inside)
    p["inspect"] = {"class_type": "FreeVideoAttentionInspector", "inputs": {
        "model": ["probe", 0], "latent": ["latent", 0], "positive": ["pos", 0], "sigma": 1.0, "seed": 3}}
    p["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["inspect", 1]}}
    p["chart"] = {"class_type": "SaveImage", "inputs": {"images": ["inspect", 0], "filename_prefix": "chart"}}
    return p


def evs_inputs(**settings):
    evs = {"latent": ["latent", 0], "image_model": ["probe", 0], "image_positive": ["pos", 0], "image_negative": ["neg", 0],
           "video_model": ["probe", 0], "video_positive": ["pos", 0], "video_negative": ["neg", 0], "seed": 1,
           "image_steps": 4, "image_cfg": 3.0, "image_sampler": "euler", "image_scheduler": "simple", "strength": 0.5,
           "t_T2V": 1, "video_steps": 2, "video_cfg": 3.0, "video_sampler": "euler", "video_scheduler": "simple",
           "t_V": 2, "n_V": 1, "sfi": False, "sfi_gamma": 0.8, "sfi_layers": "all",
           "image_vae": ["vae", 0], "video_vae": ["vae", 0]}
    evs.update(settings)
    return {k: v for k, v in evs.items() if v is not None}


def evs_prompt(nonce=0, pause=0, raise_inside=False, **settings):
    p = base_nodes(nonce, pause, raise_inside, frames=9, size=32)
    p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models.wan21_vae().name}}
    p["evs"] = {"class_type": "FreeVideoEVSSampler", "inputs": evs_inputs(**settings)}
    p["save_evs"] = {"class_type": "SaveLatent", "inputs": {"samples": ["evs", 0], "filename_prefix": "evs"}}
    return p


def outputs(server, entry) -> dict:
    """A prompt's results by output node: latents as tensors, images as pixel tensors, texts as text."""
    from PIL import Image
    import numpy as np
    result = {}
    for node_id, node_out in entry["outputs"].items():
        for kind, items in node_out.items():
            for i, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict) and "filename" in item:
                    folder = server.output_dir if item.get("type", "output") == "output" else server.base / item["type"]
                    path = folder / item.get("subfolder", "") / item["filename"]
                    if path.suffix == ".latent":
                        value = load_file(str(path))["latent_tensor"]
                    else:
                        value = torch.from_numpy(np.array(Image.open(path)))
                    result[f"{node_id}.{kind}.{i}"] = value
                elif isinstance(item, str):
                    result[f"{node_id}.{kind}.{i}"] = item
    assert result, entry
    return result


def assert_same(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for key in want:
        if isinstance(want[key], str):
            assert got[key] == want[key], f"{what}: {key}"
        else:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), \
                f"{what}: {key} differs from the fresh server's (max |diff| {(got[key].double() - want[key].double()).abs().max():.3g})"


def only(results: dict, node: str) -> dict:
    return {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith(node + ".")}


def queue(server, prompt) -> str:
    return server.post("/prompt", {"prompt": complete(server, prompt), "client_id": uuid.uuid4().hex})["prompt_id"]


def wait(server, prompt_id, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.02)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def run(server, prompt) -> dict:
    return outputs(server, server.run(complete(server, prompt)))


def interrupt(server, prompt_id):
    """POST /interrupt for this prompt, as the UI's cancel button does (the answer has no body)."""
    import urllib.request
    req = urllib.request.Request(server.url + "/interrupt", data=json.dumps({"prompt_id": prompt_id}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def reset_calls(server):
    server.post("/freevideo_test/reset", {})


def model_calls(server) -> int:
    return server.get("/freevideo_test/state")["model_calls"]


# --- isolation -------------------------------------------------------------------------------

@pytest.mark.server
def test_patched_and_plain_in_one_prompt_and_in_consecutive_prompts(server, reference):
    plain = reference("plain", wan_prompt(None))["save_out.latents.0"]
    eav = reference("eav4", wan_prompt("eav"))["save_out.latents.0"]
    ieg = reference("ieg1", wan_prompt("ieg"))["save_out.latents.0"]
    assert not torch.equal(plain, eav) and not torch.equal(plain, ieg) and not torch.equal(eav, ieg)

    # one prompt: the loaded model sampled plain, enhanced and guided (whatever order ComfyUI picks)
    p = base_nodes(nonce=next(_nonce))
    p["eav"] = method_node("eav", ["probe", 0])
    p["ieg"] = method_node("ieg", ["probe", 0])
    for name, model in (("plain", ("probe", 0)), ("eav", ("eav", 0)), ("ieg", ("ieg", 0))):
        add_sampler(p, name, model)
    got = run(server, p)
    assert torch.equal(got["save_plain.latents.0"], plain)
    assert torch.equal(got["save_eav.latents.0"], eav)
    assert torch.equal(got["save_ieg.latents.0"], ieg)

    # consecutive prompts on the same loaded model (the loader's output stays cached): plain after
    # patched, patched after plain, in both orders
    for method, want in (("eav", eav), (None, plain), ("ieg", ieg), (None, plain), ("eav", eav)):
        got = run(server, wan_prompt(method, nonce=next(_nonce)))["save_out.latents.0"]
        assert torch.equal(got, want), f"{method or 'plain'} after other prompts differs from the fresh server"


@pytest.mark.server
def test_queued_prompts_with_different_settings_do_not_see_each_other(server, reference):
    configs = [("eav", dict(weight=2.0)), ("eav", dict(weight=8.0)), ("ieg", dict(scale=1.0)), ("ieg", dict(scale=3.0)),
               (None, {})]
    alone = [reference(f"{m}-{s}", wan_prompt(m, **s))["save_out.latents.0"] for m, s in configs]
    assert len({tuple(a.flatten()[:8].tolist()) for a in alone}) == len(alone)  # five different results
    # queued back to back (each waits for the one before in ComfyUI's queue), twice over
    ids = [queue(server, wan_prompt(m, nonce=next(_nonce), **s)) for _ in range(2) for m, s in configs]
    for i, prompt_id in enumerate(ids):
        entry = wait(server, prompt_id)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert torch.equal(outputs(server, entry)["save_out.latents.0"], alone[i % len(configs)]), configs[i % len(configs)]
    # both weights of one node type in one prompt, on the same loaded model
    p = base_nodes(nonce=next(_nonce))
    for name, (m, s) in zip("abcd", configs[:4]):
        p[f"m_{name}"] = method_node(m, ["probe", 0], **s)
        add_sampler(p, name, (f"m_{name}", 0))
    got = run(server, p)
    for name, want in zip("abcd", alone):
        assert torch.equal(got[f"save_{name}.latents.0"], want), name


@pytest.mark.server
def test_twenty_prompts_grow_nothing(server, reference):
    """RSS of the server process and what the loaded model carries, after each of 20 prompts that
    alternate the nodes and their settings (each re-runs its node: new settings or a new nonce)."""
    plain = reference("plain", wan_prompt(None))["save_out.latents.0"]
    configs = [("eav", dict(weight=2.0 + 0.5 * i)) if i % 4 == 0 else ("ieg", dict(scale=1.0 + 0.25 * i)) if i % 4 == 1
               else (None, {}) if i % 4 == 2 else ("inspector", {}) for i in range(20)]
    figures = []
    for i, (method, settings) in enumerate(configs):
        if method == "inspector":
            run(server, inspector_prompt(nonce=next(_nonce)))
        else:
            got = run(server, wan_prompt(method, nonce=next(_nonce), **settings))["save_out.latents.0"]
            if method is None:
                assert torch.equal(got, plain), f"plain prompt {i} differs from the fresh server"
        figures.append(server.get("/freevideo_test/stats"))
    keys = ["patchers", "wrappers", "callbacks", "object_patches", "hooked_modules_alive", "tensors", "tensor_bytes"]
    print("\nprompt  rss_MiB  " + "  ".join(keys) + "  applied_object_patches  torch_hooks")
    for i, f in enumerate(figures):
        applied = sum(m["object_patches_applied"] for m in f["loaded_models"])
        hooks = sum(m["torch_hooks"] for m in f["loaded_models"])
        print(f"{i + 1:6d}  {f['rss'] / 2**20:7.1f}  " + "  ".join(str(f[k]) for k in keys) + f"  {applied}  {hooks}")
    warm = figures[3:]  # after one prompt of each kind
    # the model the user loaded never carries anything of ours
    for f in figures:
        assert (f["root_object_patches"], f["root_wrappers"], f["root_callbacks"]) == (0, 0, 0), f
        assert all(m["torch_hooks"] == 0 for m in f["loaded_models"]), f
    # everything else stays within what one prompt of each kind leaves behind
    for key in keys[:-2]:
        assert max(f[key] for f in warm[4:]) <= max(f[key] for f in warm[:4]), (key, [f[key] for f in figures])
    assert max(f["tensors"] for f in warm) - min(f["tensors"] for f in warm) <= 64, [f["tensors"] for f in figures]
    assert max(f["tensor_bytes"] for f in warm[4:]) <= max(f["tensor_bytes"] for f in warm[:4]) + 2**20
    growth = warm[-1]["rss"] - min(f["rss"] for f in warm[:4])
    assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 16 prompts after warm-up"


# --- interrupt -------------------------------------------------------------------------------

INTERRUPTS = {
    # node: (prompt builder, model call to interrupt at, output node)
    "enhance_a_video": (lambda **kw: wan_prompt("eav", **kw), 2, "save_out"),
    "entropy_guidance": (lambda **kw: wan_prompt("ieg", **kw), 2, "save_out"),  # after the registry call
    "attention_inspector": (inspector_prompt, 1, None),
    "evs": (evs_prompt, 3, "save_evs"),
}


@pytest.mark.server
@pytest.mark.parametrize("inside", [False, True], ids=["at_step_end", "inside_step"])
@pytest.mark.parametrize("node", list(INTERRUPTS))
def test_interrupt_then_the_same_prompt_is_right(server, reference, node, inside):
    """The probe pauses at a model call until POST /interrupt arrives; then either the model call
    runs and ComfyUI's progress hook stops the run at the step's end (at_step_end; the inspector
    stops inside its model call, where it reports progress per layer), or the interrupt exception
    is raised inside the step before the model call (inside_step). The identical prompt, queued
    next, re-uses the cached patched model and must equal a fresh server's result."""
    build, at_call, _ = INTERRUPTS[node]
    want = reference(node, build())
    prompt = build(nonce=next(_nonce), pause=at_call, raise_inside=inside)
    reset_calls(server)
    prompt_id = queue(server, prompt)
    deadline = time.time() + 120
    while not server.get("/freevideo_test/state")["waiting"]:
        assert time.time() < deadline, "the probe never paused"
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        assert entry is None, f"the prompt ended before the pause: {entry['status']}"
        time.sleep(0.02)
    interrupt(server, prompt_id)
    entry = wait(server, prompt_id)
    events = [m[0] for m in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, entry["status"]
    calls = model_calls(server)
    assert calls == at_call, f"{calls} model calls ran; the run should stop at call {at_call}"
    # the same prompt again: the counter is past the pause, so it runs through
    got = outputs(server, wait(server, queue(server, prompt)))
    assert_same(got, want, f"{node} after an interrupt")


# --- precision -------------------------------------------------------------------------------

def _naive_temporal_cfi(q, k, frames):
    """Mean off-diagonal temporal attention in float64, the attention map written out."""
    b, n, h, d = q.shape
    s = n // frames
    qf = q.double().view(b, frames, s, h, d).permute(0, 2, 3, 1, 4)
    kf = k.double().view(b, frames, s, h, d).permute(0, 2, 3, 1, 4)
    a = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(d), dim=-1)
    off = a.sum(dim=(-1, -2)) - torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
    return off.mean(dim=(1, 2)) / (frames * (frames - 1))


def _naive_entropy(q, k):
    a = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    e = -(a * torch.log(a.clamp_min(1e-300))).sum(-1) / math.log(k.shape[2])
    return e.mean(dim=(1, 2))


# q, k = N(0, 1) x factor: 1 is an ordinary map; from 30 on (logits ~ 1e3 x sqrt(D)) nearly every
# softmax row is one-hot; 1e4 puts entries at float16's limit (65504, clamped), the largest an fp16
# model can hand the kernel, in every dtype.
SATURATION = [1.0, 30.0, 1e3, 1e4]
FP16_MAX = torch.finfo(torch.float16).max


def _saturated(shape, dtype, factor, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * factor).clamp(-FP16_MAX, FP16_MAX).to(dtype)


@pytest.mark.parametrize("factor", SATURATION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cross_frame_intensity_stays_finite_when_softmax_saturates(dtype, factor):
    from freevideo.enhance_core.measures.cross_frame_intensity import enhance_scale, temporal_off_diagonal_mean
    frames, s, h, d = 5, 12, 2, 64
    q = _saturated((2, frames * s, h, d), dtype, factor, 1)
    k = _saturated((2, frames * s, h, d), dtype, factor, 2)
    cfi = temporal_off_diagonal_mean(q, k, frames)
    assert cfi.dtype == torch.float32 and torch.isfinite(cfi).all() and (cfi >= 0).all() and (cfi <= 1).all(), cfi
    torch.testing.assert_close(cfi.double(), _naive_temporal_cfi(q, k, frames), rtol=1e-4, atol=1e-6)
    scale = enhance_scale(q, k, frames, 4.0)
    assert torch.isfinite(scale).all() and (scale >= 1).all()


@pytest.mark.parametrize("factor", SATURATION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_entropy_stays_finite_when_softmax_saturates(dtype, factor):
    from freevideo.enhance_core.measures.attention_entropy import attention_entropy, row_entropy_chunked
    q = _saturated((2, 2, 48, 64), dtype, factor, 3)
    k = _saturated((2, 2, 48, 64), dtype, factor, 4)
    want = _naive_entropy(q, k)
    exact = attention_entropy(q, k, rows=None)  # fused SDPA path (and its fallback for overflowing rows)
    sampled = attention_entropy(q, k, rows=16)
    masked = attention_entropy(q, k, torch.ones(48, 48, dtype=torch.bool), rows=None)  # chunked path
    for e in (exact, sampled, masked):
        assert e.dtype == torch.float32 and torch.isfinite(e).all() and (e >= 0).all() and (e <= 1).all(), e
    torch.testing.assert_close(exact.double(), want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(masked.double(), want, rtol=1e-3, atol=1e-4)
    rows = row_entropy_chunked(q, k)
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_guidance_maps_stay_finite_at_the_dtype_limits(dtype):
    """U's mean over the keys of values at float16's limit (a float16 sum would overflow) and a
    masked U with a fully saturating additive mask."""
    from freevideo.enhance_core.methods.entropy_guidance import replaced_attention
    v = torch.full((1, 2, 64, 8), FP16_MAX, dtype=dtype)
    v[..., 1] = -FP16_MAX
    big = v[0, 0, 0, 0]
    u = replaced_attention("uniform", v, 64)
    assert u.dtype == dtype and torch.isfinite(u).all()
    assert torch.equal(u[..., 0], torch.full_like(u[..., 0], big)) and torch.equal(u[..., 1], torch.full_like(u[..., 1], -big))
    mask = torch.zeros(64, 64, dtype=dtype)
    mask[:, 32:] = -big  # additive mask saturating the softmax: U over the first half only
    um = replaced_attention("uniform", v, 64, mask)
    assert torch.isfinite(um).all()
    assert torch.equal(replaced_attention("identity", v, 64), v)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.server
def test_low_precision_models_sample_with_every_node(server, dtype):
    """The tiny Wan in fp16 / bf16 (weights and compute): plain, Enhance-A-Video, entropy guidance,
    both together, the inspector and EVS run and give finite results; the methods change them."""
    p = base_nodes(nonce=next(_nonce), frames=9, size=32)
    p["load"] = {"class_type": "FreeVideoTestLowPrecisionUNETLoader", "inputs": {"unet_name": tiny_models.wan21_t2v().name, "dtype": dtype}}
    p["eav"] = method_node("eav", ["probe", 0])
    p["ieg"] = method_node("ieg", ["probe", 0])
    p["both"] = method_node("ieg", ["eav", 0])
    for name, model in (("plain", ("probe", 0)), ("eav", ("eav", 0)), ("ieg", ("ieg", 0)), ("both", ("both", 0))):
        add_sampler(p, name, model)
    p.update({k: v for k, v in inspector_prompt().items() if k in ("inspect", "report", "chart")})
    p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models.wan21_vae().name}}
    p["evs"] = {"class_type": "FreeVideoEVSSampler", "inputs": evs_inputs(latent=["ks_plain", 0], sfi=True)}
    p["save_evs"] = {"class_type": "SaveLatent", "inputs": {"samples": ["evs", 0], "filename_prefix": "evs"}}
    entry = server.run(complete(server, p))
    got = outputs(server, entry)
    latents = {k: v for k, v in got.items() if k.endswith(".latents.0")}
    assert len(latents) == 5
    for key, value in latents.items():
        assert torch.isfinite(value).all(), f"{dtype}: {key} has NaN/inf"
        assert value.abs().max() > 0, key
    plain = latents["save_plain.latents.0"]
    for name in ("eav", "ieg", "both"):
        assert not torch.equal(latents[f"save_{name}.latents.0"], plain), f"{dtype}: {name} changed nothing"
    (report,) = [v for k, v in got.items() if k.startswith("report.")]
    values = [float(x) for x in re.findall(r"^\s*\d+\s+(\S+)\s+(\S+)", report, re.M) for x in x if x != "n/a"]
    assert len(values) == 8 and all(math.isfinite(v) and 0 <= v <= 1 for v in values), report
    assert "nan" not in report.lower()


# --- bad input -------------------------------------------------------------------------------

def _eav(**s):
    return wan_prompt("eav", **s)


def _ieg(**s):
    return wan_prompt("ieg", **s)


def _with(prompt, node, **inputs):
    prompt[node]["inputs"].update(inputs)
    return prompt


def _image_model(prompt):
    """The tiny SD1.5-layout UNet instead of the video model."""
    prompt["load"] = {"class_type": "FreeVideoTestTinyImageModel", "inputs": {"kind": "sd15"}}
    return prompt


def _image_latent(prompt):
    """A 4-D image latent with content ([1, 4, 8, 8]; an empty one ComfyUI itself would turn into
    a one-frame video): a 64x64 image encoded by the SD1.5 (TAESD) VAE."""
    prompt["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x336699}}
    prompt["taesd"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd_sd15.safetensors"}}
    prompt["latent"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["taesd", 0]}}
    return prompt


FAMILIES = r"is not a supported video model\. Supported families: Wan"
# (case, prompt, pattern the error must match). Each names the input and what is allowed.
BAD_INPUT = [
    ("empty prompt", lambda: {}, r"no outputs|no_prompt"),
    ("method node without output", lambda: {"m": method_node("eav", ["probe", 0]), **base_nodes()}, r"no outputs"),
    ("eav: model not connected", lambda: _with(_eav(), "method", model=None), r"model.*(missing|required)|(missing|required).*model"),
    ("eav: weight below its minimum", lambda: _eav(weight=-1.0), r"weight.*min of 0|min of 0.*weight"),
    ("eav: weight above its maximum", lambda: _eav(weight=1000.0), r"weight.*max of 100|max of 100.*weight"),
    ("eav: weight NaN", lambda: _eav(weight=float("nan")), r"weight: nan is not a number; use 0 \(off\) to 100"),
    ("eav: window reversed", lambda: _eav(start_percent=0.8, end_percent=0.2),
     r"start_percent \(0\.8\) and end_percent \(0\.2\) must satisfy 0 <= start <= end <= 1"),
    ("eav: layer out of range", lambda: _eav(layers="0-99"),
     r"layers: layer 99 does not exist; this model has 4 self-attention layers \(0-3\)"),
    ("eav: malformed layer list", lambda: _eav(layers="1;2"),
     r"layers: cannot read '1;2'; use indices and ranges such as '0-9, 20', or 'all'"),
    ("eav: range backwards", lambda: _eav(layers="3-1"), r"layers: range '3-1' runs backwards"),
    ("eav: image model", lambda: _image_model(_eav()), r"model: UNetModel " + FAMILIES),
    ("ieg: image model", lambda: _image_model(_ieg()), r"model: UNetModel " + FAMILIES),
    ("ieg: top_k above layer count", lambda: _ieg(layers="auto", top_k=9),
     r"top_k: 9; this model has 4 self-attention layers, use 1 to 4"),
    ("ieg: scale NaN", lambda: _ieg(scale=float("nan")), r"scale: nan is not a number; use 0 \(off\) to 100"),
    ("ieg: branch pair reversed", lambda: _ieg(positive_branch="identity", negative_branch="uniform"),
     r"positive_branch 'identity' with negative_branch 'uniform' .*Use one of \(positive / negative\): uniform / identity"),
    ("ieg: same branch twice", lambda: _ieg(positive_branch="uniform", negative_branch="uniform"),
     r"positive_branch and negative_branch are both 'uniform'.*Use one of"),
    ("ieg: unknown branch", lambda: _ieg(positive_branch="mean"), r"positive_branch.*'mean'.*(not in|is not a branch; use one of uniform, original, identity)"),
    ("ieg: empty layer list", lambda: _ieg(layers=" "), r"layers: empty; use 'auto'"),
    ("ieg: layer out of range", lambda: _ieg(layers="2, 7"), r"layers: layer 7 does not exist; this model has 4"),
    ("inspector: sigma outside the model's range", lambda: _with(inspector_prompt(), "inspect", sigma=5.0),
     r"sigma: 5\.0 is outside this model's range [\d.]+ to 1"),
    ("inspector: image latent", lambda: _image_latent(inspector_prompt()),
     r"latent: shape \(1, 4, 8, 8\) is not a video latent of this model; .*\[B, 16, T, H, W\]"),
    ("inspector: top_k above layer count", lambda: _with(inspector_prompt(), "inspect", top_k=9),
     r"top_k: 9; this model has 4 self-attention layers, use 1 to 4"),
    ("inspector: image model", lambda: _image_model(inspector_prompt()), r"model: UNetModel " + FAMILIES),
    ("evs: image latent", lambda: _image_latent(evs_prompt()),
     r"latent: shape \(1, 4, 8, 8\) does not fit the video model, whose latent format \(Wan21\) takes \[B, C, T, H, W\]"),
    ("evs: single latent frame", lambda: _with(evs_prompt(), "latent", length=1), r"latent: shape .* holds a single latent frame"),
    ("evs: no VAEs for a video latent", lambda: evs_prompt(image_vae=None, video_vae=None),
     r"video_vae and image_vae: required because the video latent .* is temporally compressed"),
    ("evs: video VAE of another model", lambda: _with(evs_prompt(), "evs", video_vae=["taesd", 0]) | {
        "taesd": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd_sd15.safetensors"}}},
     r"video_vae: makes 4-channel 4-D latents, but the video latent is \(1, 16, 3, 4, 4\); connect the VAE the video belongs to"),
    ("evs: image VAE of another model", lambda: _with(evs_prompt(), "evs", image_vae=["taesd", 0]) | {
        "taesd": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd_sd15.safetensors"}}},
     r"image_vae: makes 4-channel latents; the image model's latent format \(Wan21\) has 16"),
    ("evs: t_T2V outside the image run", lambda: evs_prompt(t_T2V=3), r"t_T2V: 3 is outside the image run; .* use 1-2"),
    ("evs: n_V past the video schedule", lambda: evs_prompt(t_V=1, n_V=2), r"n_V: 2 video steps from t_V 1 run past .* use 1-1"),
    ("evs: strength NaN", lambda: evs_prompt(strength=float("nan")), r"strength: nan; use a value in \(0, 1\]"),
    ("evs: SFI layer out of range", lambda: evs_prompt(sfi=True, sfi_setting="custom*", sfi_layers="9"),
     r"sfi_layers: layer 9 does not exist; this model has 4"),
]


def _error_text(exc_or_entry) -> tuple[str, str]:
    """(where the error came, its text): rejected by /prompt, or failed while executing."""
    if isinstance(exc_or_entry, Exception):
        return "prompt", str(exc_or_entry)
    for event, data in exc_or_entry["status"]["messages"]:
        if event == "execution_error":
            return f"node {data['node_type']}", f"{data['exception_type']}: {data['exception_message']}"
    return "none", json.dumps(exc_or_entry["status"])


@pytest.mark.server
@pytest.mark.parametrize("case,build,pattern", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_clear_error_before_any_model_call(server, reference, case, build, pattern):
    plain = reference("plain", wan_prompt(None))["save_out.latents.0"]
    reset_calls(server)
    prompt = build()
    try:
        prompt_id = server.post("/prompt", {"prompt": complete(server, prompt) if prompt else {}, "client_id": uuid.uuid4().hex})["prompt_id"]
        entry = wait(server, prompt_id)
        assert entry["status"]["status_str"] == "error", f"{case}: accepted and ran ({entry['status']})"
        where, text = _error_text(entry)
    except RuntimeError as e:  # 400 from /prompt: ComfyUI's own validation
        where, text = _error_text(e)
    print(f"\n{case} -> {where}: {text[:300]}")
    assert re.search(pattern, text, re.S), f"{case}: the error does not name the input and what is allowed:\n{text[:2000]}"
    assert "Traceback" not in text
    assert model_calls(server) == 0, f"{case}: the model ran before the error"
    # the server keeps serving, and serves right
    got = run(server, wan_prompt(None, nonce=next(_nonce)))["save_out.latents.0"]
    assert torch.equal(got, plain)


# --- models that share a supported backbone but are refused ---------------------------------
# In process, on the real classes as ComfyUI's loader builds them (newer ComfyUI only): every node
# refuses them when it patches, with a message naming the model and why, instead of running with
# hooks that never fire. Anima's text adapter has a fixed 157M-parameter size: it is built on the
# meta device (refusing needs only its class).

def _patch_with(node: str, model):
    from freevideo.enhance_core.methods import (attention_inspector, enhance_a_video, entropy_editing,
                                                entropy_guidance, feature_accumulation)
    from freevideo.enhance_core.methods.evs.feature_injection import SelectiveFeatureInjection
    text = [[torch.zeros(1, 8, WAN_DIM), {}]]
    if node == "eav":
        return enhance_a_video.apply_enhance_a_video(model, weight=4.0)
    if node == "ieg":
        return entropy_guidance.apply_entropy_guidance(model, 1.0)
    if node == "editing":
        return entropy_editing.apply_entropy_editing(model, text, ratio=0.5)
    if node == "inspector":
        return attention_inspector.inspect_attention(model, {"samples": torch.zeros(1, 16, 3, 4, 4)}, text, 0.5)
    if node == "feature accumulation":
        return feature_accumulation.apply_feature_accumulation(model, gate="0.1")
    if node == "evs feature injection":
        return SelectiveFeatureInjection(model.clone(), "all", 0.8)
    raise ValueError(node)


def _causal_wan():
    pytest.importorskip("comfy.ldm.wan.ar_model", reason="this ComfyUI has no autoregressive Wan (0.33 has)")
    return tiny_models.load_diffusion_model(tiny_models.wan21_causal_ar())


def _anima():
    pytest.importorskip("comfy.ldm.anima.model", reason="this ComfyUI has no Anima (0.33 has)")
    return tiny_models.load_anima_on_meta()


REFUSED_MODELS = [
    ("autoregressive Wan", _causal_wan, "CausalWanModel",
     r"model: CausalWanModel is not supported, although it shares the Wan 2\.1 / 2\.2 backbone: autoregressive Wan "
     r".*KV cache.*whole clip in one model call"),
    ("Anima", _anima, "Anima",
     r"model: Anima is not supported, although it shares the Cosmos-Predict2 backbone: it is an image model"),
]
REFUSING_NODES = ["eav", "ieg", "editing", "inspector", "feature accumulation", "evs feature injection"]


@pytest.mark.parametrize("node", REFUSING_NODES)
@pytest.mark.parametrize("case,build,cls,pattern", REFUSED_MODELS, ids=[c[0] for c in REFUSED_MODELS])
def test_a_model_on_a_supported_backbone_that_the_methods_cannot_act_on_is_refused(case, build, cls, pattern, node):
    model = build()
    assert type(model.get_model_object("diffusion_model")).__name__ == cls  # what ComfyUI's loader built
    patches = dict(model.object_patches)
    with pytest.raises(ValueError, match=pattern) as refused:
        _patch_with(node, model)
    if node == "evs feature injection":
        assert str(refused.value).startswith("video_model (Selective Feature Injection): model: ")
    assert model.object_patches == patches  # the model passed in is left as it was
