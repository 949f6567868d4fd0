"""The workflow files in ComfyUI's real frontend, the way a user uses them: ComfyUI's own server
serves its own frontend package to headless Chromium; each file in workflows/ is dropped onto the
canvas; the page must know every node type (except a named third-party pack's, when that pack is not
installed) and show every FreeVideo widget with the value the file means, valid for its input.
Variants of the Wan workflows that point at tiny models are queued with the page's Run button and
their outputs checked.

Needs Chromium (installed with apt-get when missing and running as root) and Playwright; skipped,
with the reason, where either is missing. The AnimateDiff-Evolved snapshot comes from
FREEVIDEO_PEERS (default ../shared/peers beside the repository); without it that pack's nodes may be
unknown to the page, and the workflow's note and the README must name the pack.

FREEVIDEO_UPDATE_SCREENSHOTS=1 writes the screenshots of the loaded graphs to
docs/images/workflows/<name>.png and the template thumbnails to workflows/<name>.jpg; otherwise
they go to a temporary folder and are only checked.
"""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from support import browser_page, tiny_models
from support.comfy_server import PACK_NAME, ComfyServer
from support.in_process import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.server]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCREENSHOTS = ROOT / "docs" / "images" / "workflows"
UPDATE_SCREENSHOTS = os.environ.get("FREEVIDEO_UPDATE_SCREENSHOTS") == "1"
PEERS = Path(os.environ.get("FREEVIDEO_PEERS", ROOT.parent / "shared" / "peers"))

# Third-party packs a workflow may use: node type prefix -> (pack name as the notes and README name
# it, snapshot file prefix in FREEVIDEO_PEERS).
THIRD_PARTY = {"ADE_": ("AnimateDiff-Evolved", "ComfyUI-AnimateDiff-Evolved")}

# Which widget of a loader holds a model file, and the models/ folder ComfyUI reads it from.
MODEL_FILES = {
    "UNETLoader": [(0, "diffusion_models")],
    "CLIPLoader": [(0, "text_encoders")],
    "DualCLIPLoader": [(0, "text_encoders"), (1, "text_encoders")],
    "VAELoader": [(0, "vae")],
    "CheckpointLoaderSimple": [(0, "checkpoints")],
    "ADE_LoadAnimateDiffModel": [(0, "animatediff_models")],
}
NOTE_TYPES = ("Note", "MarkdownNote")
SEED_CONTROL = ("fixed", "increment", "decrement", "randomize")

PNG_MAX_BYTES = 300_000
THUMBNAIL_MAX_BYTES = 60_000
THUMBNAIL_SIZE = (512, 320)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def model_files(workflow: dict) -> list[tuple[str, str]]:
    """(folder, file name) of every model file the workflow's loaders name."""
    return [(folder, node["widgets_values"][i]) for node in workflow["nodes"]
            for i, folder in MODEL_FILES.get(node["type"], [])]


def note_text(workflow: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in NOTE_TYPES)


def peer_snapshot(prefix: str) -> Path | None:
    found = sorted(PEERS.glob(f"{prefix}-*.tar.gz"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def chromium():
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing: "
                        "pip install -r tests/requirements.txt")
    path, why = browser_page.ensure_chromium()
    if path is None:
        pytest.skip(f"browser test needs Chromium: {why}")
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    browser_page.write_settings(base)
    # Empty stand-ins named like the real model files, so the loaders' lists hold what the
    # workflows name (as on a user's machine); the tiny models are what the runs load.
    for path in WORKFLOWS:
        for folder, name in model_files(load(path)):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).touch()
    installed = {}
    for prefix, (pack, snapshot_prefix) in THIRD_PARTY.items():
        snapshot = peer_snapshot(snapshot_prefix)
        if snapshot is None:
            continue
        with tarfile.open(snapshot) as tf:
            tf.extractall(base / "peers", filter="data")
        (base / "custom_nodes").mkdir(exist_ok=True)
        (base / "custom_nodes" / snapshot_prefix).symlink_to(base / "peers" / snapshot_prefix)
        installed[prefix] = pack
    models = {"diffusion_models": [tiny_models.wan21_t2v()], "vae": [tiny_models.wan21_vae()]}
    with ComfyServer(base, models=models) as s:
        s.third_party_installed = installed
        s.object_info = s.get("/object_info")
        yield s


@pytest.fixture(scope="module")
def page(server, chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            # Drawn at twice the resolution, saved at the viewport's: small text stays legible.
            tab = browser.new_page(viewport=browser_page.VIEWPORT, device_scale_factor=2)
            comfy = browser_page.ComfyPage(tab, server.url)
            comfy.open()
            yield comfy
        finally:
            browser.close()


# --- what a file means ---------------------------------------------------------------------------

def declared_inputs(info: dict) -> list[tuple[str, list]]:
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order")
    names = order.get("required", []) + order.get("optional", []) if order else list(declared)
    return [(name, declared[name]) for name in names]


def is_widget(declared: list) -> bool:
    kind = declared[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def has_seed_control(name: str, declared: list) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input: when the
    input asks for one, and for any integer named seed or noise_seed that does not refuse one."""
    control = (declared[1] if len(declared) > 1 else {}).get("control_after_generate")
    if declared[0] == "INT":
        return bool(control if control is not None else name in ("seed", "noise_seed"))
    return bool(control)


def meant_widgets(node: dict, info: dict, complete: bool = True) -> list[tuple[str, object]]:
    """The file's widgets_values named by the node's declared widget inputs, in the server's order,
    with the frontend's "control after generate" value after each seed (see has_seed_control).
    complete=False accepts a file without values for trailing inputs (that a newer ComfyUI added to
    one of its own nodes: the page gives them their defaults)."""
    values = list(node.get("widgets_values", []))
    named = []
    for name, declared in declared_inputs(info):
        if not is_widget(declared):
            continue
        if not values and not complete:
            break
        assert values, f"node {node['id']} ({node['type']}): no value in the file for widget {name}"
        named.append((name, values.pop(0)))
        if has_seed_control(name, declared):
            assert values, f"node {node['id']} ({node['type']}): no 'control after generate' value after {name}"
            named.append(("control_after_generate", values.pop(0)))
    assert not values, f"node {node['id']} ({node['type']}): values {values} in the file match no widget"
    return named


def invalid(value, declared: list) -> str | None:
    """Why `value` does not fit the declared input, or None."""
    kind = declared[0]
    options = declared[1] if len(declared) > 1 else {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if kind == "INT" and value != int(value):
        return f"{value!r} is not an integer"
    if "min" in options and value < options["min"]:
        return f"{value} < min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} > max {options['max']}"
    return None


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


# --- loading every workflow ----------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_the_page(page, server, path, tmp_path):
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    shown = page.drop_file(path.name, path.read_text())
    assert page.active_workflow_name() == path.stem

    # Node types: all known, except a third-party pack's that this server lacks and that the
    # workflow's note and the README name.
    notes, readme = note_text(workflow), (ROOT / "README.md").read_text()
    unknown = [n["type"] for n in shown if not n["known"]]
    for kind in unknown:
        prefix = next((p for p in THIRD_PARTY if kind.startswith(p)), None)
        assert prefix is not None and prefix not in server.third_party_installed, \
            f"{path.name}: node type {kind} is unknown to the page"
    for prefix, (pack, snapshot_prefix) in THIRD_PARTY.items():
        if any(n["type"].startswith(prefix) for n in workflow["nodes"]):
            assert pack in notes and pack in readme, f"{path.name} uses {pack}: its note and the README must name it"
    if unknown:
        print(f"{path.name}: {sorted(set(unknown))} not installed here (no snapshot in {PEERS}); "
              "their widgets are not checked")

    # Every FreeVideo widget, by name: the value the file means, valid for its input.
    ours = [n for n in shown if n["type"].startswith("FreeVideo")]
    assert ours, f"{path.name} has no FreeVideo node"
    for node in ours:
        info = server.object_info[node["type"]]
        declared = dict(declared_inputs(info))
        meant = meant_widgets(nodes[node["id"]], info)
        assert [name for name, _ in node["widgets"]] == [name for name, _ in meant], \
            f"{path.name} node {node['id']} ({node['type']}): the page shows widgets {node['widgets']}, the file means {meant}"
        for (name, value), (_, want) in zip(node["widgets"], meant):
            assert same(value, want), f"{path.name} node {node['id']} {name}: page shows {value!r}, the file means {want!r}"
            if name == "control_after_generate":
                assert value in SEED_CONTROL, f"{path.name} node {node['id']}: control after generate {value!r}"
            else:
                why = invalid(value, declared[name])
                assert why is None, f"{path.name} node {node['id']} ({node['type']}) {name}: {why}"

    # The page's own conversion to an API prompt agrees with the file for our nodes.
    prompt = page.graph_to_prompt()
    for node in ours:
        sent = prompt[str(node["id"])]["inputs"]
        for name, want in meant_widgets(nodes[node["id"]], server.object_info[node["type"]]):
            if name != "control_after_generate":
                assert same(sent[name], want), f"{path.name} node {node['id']} {name}: page queues {sent[name]!r}, file {want!r}"

    # The note says which model files go where.
    assert notes, f"{path.name} has no note"
    for folder, name in model_files(workflow):
        assert f"models/{folder}/{name}" in notes, f"{path.name}: the note must say models/{folder}/{name}"

    # A screenshot of the whole graph, nothing over it.
    page.tidy()
    page.fit_view()
    shot = page.screenshot(tmp_path / f"{path.stem}.png")
    check_screenshot(shot)
    if UPDATE_SCREENSHOTS:
        assert not unknown, f"{path.name}: install every pack it uses before updating its screenshot"
        save_screenshot(shot, path.stem)


def check_screenshot(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (browser_page.VIEWPORT["width"], browser_page.VIEWPORT["height"])
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path.name} looks blank"


def save_screenshot(shot: Path, stem: str) -> None:
    from PIL import Image
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            SCREENSHOTS / f"{stem}.png", optimize=True)
        im.resize(THUMBNAIL_SIZE, Image.Resampling.LANCZOS).save(
            ROOT / "workflows" / f"{stem}.jpg", quality=82, optimize=True)


def test_every_workflow_has_its_screenshot_and_template_thumbnail(server):
    """docs/images/workflows/<name>.png for the README; workflows/<name>.jpg beside each file, the
    name and extension under which ComfyUI's template browser shows a custom node pack's template."""
    from PIL import Image
    import urllib.request
    for path in WORKFLOWS:
        png, jpg = SCREENSHOTS / f"{path.stem}.png", path.with_suffix(".jpg")
        assert png.is_file() and jpg.is_file(), f"run FREEVIDEO_UPDATE_SCREENSHOTS=1 pytest tests/test_browser.py for {path.name}"
        with Image.open(png) as im:
            assert im.size == (browser_page.VIEWPORT["width"], browser_page.VIEWPORT["height"])
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == THUMBNAIL_SIZE
        assert png.stat().st_size <= PNG_MAX_BYTES and jpg.stat().st_size <= THUMBNAIL_MAX_BYTES
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_NAME}/{path.stem}.jpg") as r:
            assert r.read() == jpg.read_bytes()


# --- running tiny variants from the page ---------------------------------------------------------

def tiny_variant(workflow: dict) -> dict:
    """The same graph on the tiny models: loaders name the tiny files, each text encoder becomes
    the test conditioning node (same text), a 64x64 latent of 9 frames (3 latent frames), 3 steps."""
    unet, vae = tiny_models.wan21_t2v().name, tiny_models.wan21_vae().name
    workflow = json.loads(json.dumps(workflow))
    dropped = {n["id"] for n in workflow["nodes"] if n["type"] in ("CLIPLoader", "DualCLIPLoader")}
    dropped_links = {link[0] for link in workflow["links"] if link[1] in dropped}
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] not in dropped]
    workflow["links"] = [link for link in workflow["links"] if link[0] not in dropped_links]
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind == "UNETLoader":
            values[0] = unet
        elif kind == "VAELoader":
            values[0] = vae
        elif kind == "CLIPTextEncode":
            node["type"] = "FreeVideoTestTextConditioning"
            node["inputs"] = [i for i in node["inputs"] if i["name"] != "clip"]
            node["widgets_values"] = [values[0], 8, 4096]
        elif kind == "EmptyHunyuanLatentVideo":
            values[:3] = [64, 64, 9]
        elif kind == "KSampler":
            values[2] = 3
    return workflow


def save_sampled_latents(workflow: dict) -> dict:
    """Add a SaveLatent after each KSampler ("plain" when its model comes straight from a loader
    chain without a FreeVideo node, else "changed"): exact values to compare, which lossy video
    files are not."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def through_ours(node_id: int) -> bool:
        node = nodes[node_id]
        if node["type"].startswith("FreeVideo"):
            return True
        model = next((i for i in node.get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None), None)
        return model is not None and through_ours(links[model["link"]][1])

    for sampler in [n for n in workflow["nodes"] if n["type"] == "KSampler"]:
        node_id, link_id = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
        workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id
        name = "changed" if through_ours(sampler["id"]) else "plain"
        workflow["nodes"].append({
            "id": node_id, "type": "SaveLatent", "pos": [sampler["pos"][0], sampler["pos"][1] - 80], "size": [300, 60],
            "flags": {}, "order": len(workflow["nodes"]), "mode": 0,
            "inputs": [{"name": "samples", "type": "LATENT", "link": link_id}], "outputs": [], "properties": {},
            "widgets_values": [f"latents/{name}"]})
        workflow["links"].append([link_id, sampler["id"], 0, node_id, 0, "LATENT"])
        sampler["outputs"][0].setdefault("links", []).append(link_id)
    return workflow


def video_frames(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def saved_latent(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


def check_side_by_side(files: dict[str, Path], single: str, pair: str) -> None:
    """Plain and changed (same seed): exact latents that differ; the videos: plain (left) | changed
    (right), both real pictures, and the changed one on its own."""
    import torch
    plain, changed = saved_latent(files["plain"]), saved_latent(files["changed"])
    assert plain.shape == changed.shape == (1, 16, 3, 8, 8), (plain.shape, changed.shape)
    assert torch.isfinite(plain).all() and torch.isfinite(changed).all()
    assert 0.1 < plain.std() < 100 and 0.1 < changed.std() < 100, (plain.std(), changed.std())
    relative = ((changed - plain).norm() / plain.norm()).item()
    assert relative > 1e-3, f"the FreeVideo node changed nothing (relative difference {relative:.2e})"

    sbs, one = video_frames(files[pair]), video_frames(files[single])
    assert one.shape == (9, 64, 64, 3), one.shape
    assert sbs.shape == (9, 64, 64 + 8 + 64, 3), sbs.shape
    left, spacer, right = sbs[:, :, :64], sbs[:, :, 64:72], sbs[:, :, 72:]
    assert spacer[:, :, 2:-2].mean() > 230, "the white spacing between the two videos"
    for video in (left, right, one):
        assert video.std() > 3, "a blank video"
    assert np.abs(left - right).mean() > 0.5, "the two halves of the side-by-side video are the same"


def check_inspector(files: dict[str, Path], texts: list[str]) -> None:
    from PIL import Image
    (chart,) = [p for p in files.values() if p.suffix == ".png"]
    with Image.open(chart) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 10, pixels.shape
    orange = ((pixels[..., 0] > 200) & (pixels[..., 1] > 90) & (pixels[..., 1] < 190) & (pixels[..., 2] < 80)).sum()
    assert orange > 50, "no highlighted (orange) layer in the chart"
    (table,) = texts
    assert table.count("\n") >= 4, table


RUNS = {
    "wan21_t2v_enhance_a_video": lambda files, texts: check_side_by_side(
        files, "wan21_enhance_a_video", "wan21_enhance_a_video_side_by_side"),
    "wan21_entropy_guidance": lambda files, texts: check_side_by_side(
        files, "wan21_ie_adapt", "wan21_ie_adapt_side_by_side"),
    "wan21_attention_inspector": check_inspector,
}


@pytest.mark.parametrize("stem", list(RUNS))
def test_tiny_variant_runs_from_the_run_button(page, server, stem):
    workflow = save_sampled_latents(tiny_variant(load(ROOT / "workflows" / f"{stem}.json")))
    page.drop_file(f"{stem}_tiny.json", json.dumps(workflow))
    page.tidy()
    page.start_listening()
    prompt_id, sent = page.press_run()

    # What the page queued is the file's graph, value for value (the page may add inputs that the
    # file leaves at their defaults on newer ComfyUI).
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        queued = sent[str(node["id"])]
        assert queued["class_type"] == node["type"]
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                link = links[i["link"]]
                assert queued["inputs"][i["name"]] == [str(link[1]), link[2]], (node["id"], i["name"])
        info = server.object_info[node["type"]]
        if any(d[0] == "COMFY_DYNAMICCOMBO_V3" for _, d in declared_inputs(info)):
            continue  # newer ComfyUI's SaveVideo: format options nest; tests/test_server_end_to_end converts those
        for name, want in meant_widgets(node, info, complete=node["type"].startswith("FreeVideo")):
            if name != "control_after_generate":
                assert same(queued["inputs"].get(name), want), f"node {node['id']} {name}: {queued['inputs'].get(name)!r} != {want!r}"

    events = page.wait_finished(prompt_id)
    kinds = [e["type"] for e in events]
    errors = [e["detail"] for e in events if e["type"] != "execution_success" and e["type"].startswith("execution_") and e["type"] != "execution_start"]
    assert kinds[-1] == "execution_success" and not errors, json.dumps(errors)[:3000]
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success"
    # The page was told about each output node's results, as the server recorded them.
    shown = {e["detail"]["node"] for e in events if e["type"] == "executed"}
    assert shown == set(entry["outputs"]), (shown, set(entry["outputs"]))

    files = {}
    for path in server.output_files(entry):
        assert path.is_file() and path.stat().st_size > 0, path
        files[path.name.rsplit("_", 2)[0] if path.suffix in (".mp4", ".latent") else path.name] = path
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    print(f"{stem}: ran from the page in {page.elapsed:.1f} s: {sorted(p.name for p in files.values())}")
    RUNS[stem](files, texts)
