"""Installed the way users install it, and checked the way the Comfy Registry checks it.

- ComfyUI-Manager's own command-line installer (`cm-cli`, from the `comfyui-manager` package, run
  with ComfyUI's Python and COMFYUI_PATH) installs this repository's committed HEAD from a git URL
  into a fresh copy of ComfyUI: a bare clone served over loopback HTTP, since the Manager clones
  http(s) URLs only. ComfyUI's own server then starts from that copy (with the built-in Manager
  enabled where this ComfyUI has one) and must list every node of the pack.
- `comfy node validate` (comfy-cli, in a small virtual environment of its own) passes on
  pyproject.toml without warnings, and pyproject.toml has every field the Registry shows.
- The suite runs from a clone named like the repository (ComfyUI-FreeVideo), as users clone it.

The ComfyUI tree under test (embedded or COMFYUI_PATH) is copied, never modified. The Manager's own
network fetches (node lists, the registry) go to a closed loopback proxy and fail at once, as on
a machine without network; the pack's requirements are already in ComfyUI's environment.
"""

import fcntl
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

from support.comfy_server import PACK_NAME, ComfyServer, free_port
from support.in_process import COMFY, ROOT

# Top-level entries of the ComfyUI tree that a fresh install does not have or that belong to a user.
NOT_COPIED = {".git", "custom_nodes", "user", "output", "input", "temp", "models", "extra_model_paths.yaml"}
COMFY_CLI = "comfy-cli==1.23.0"
PAPERS = ("Enhance-A-Video: Better Generated Video for Free", "Understanding Attention Mechanism in Video Diffusion Models",
          "Encapsulated Composition of Text-to-Image and Text-to-Video Models", "RepVideo")
COMFY_CLI_VENV = Path(os.environ.get("FREEVIDEO_COMFY_CLI_VENV", ROOT / ".runtime" / "comfy-cli"))


def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def expected_node_ids() -> set[str]:
    from freevideo.nodes import NODES
    return {node.define_schema().node_id for node in NODES}


def offline_env(**extra) -> dict:
    """The environment with every proxied request sent to a closed loopback port (loopback exempt)."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, **extra)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = dead
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.pop("COMFYUI_FOLDERS_BASE_PATH", None)
    return env


# --- ComfyUI-Manager ---------------------------------------------------------------------------

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def git_url(tmp_path_factory):
    """This repository's committed HEAD as a bare clone served over loopback HTTP (git's dumb
    protocol: static files after `git update-server-info`)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the Manager clones with it")
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: nothing committed to serve")
    served = tmp_path_factory.mktemp("served")
    bare = served / f"{PACK_NAME}.git"
    git("clone", "--quiet", "--bare", str(ROOT), str(bare))
    git("update-server-info", cwd=bare)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{bare.name}"
    httpd.shutdown()
    httpd.server_close()


def fresh_comfyui(dest: Path) -> Path:
    """A copy of the ComfyUI tree under test, as a fresh install: empty custom_nodes, no user data."""
    shutil.copytree(COMFY, dest, symlinks=True,
                    ignore=lambda folder, names: NOT_COPIED & set(names) if Path(folder) == COMFY else set())
    (dest / "custom_nodes").mkdir()
    # The Manager's own setting for machines without network (it still tries the registry).
    (dest / "user" / "__manager").mkdir(parents=True)
    (dest / "user" / "__manager" / "config.ini").write_text("[default]\nnetwork_mode = offline\n")
    return dest


@pytest.fixture(scope="module")
def manager_install(tmp_path_factory, git_url):
    """ComfyUI-Manager's cm-cli installs the pack from git_url into a fresh ComfyUI copy."""
    missing = [m for m in ("comfyui_manager", "cm_cli") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"comfyui-manager is not installed in ComfyUI's Python {sys.executable} (no module "
                    f"{', '.join(missing)}): `{sys.executable} -m pip install -r tests/requirements.txt`")
    comfy = fresh_comfyui(tmp_path_factory.mktemp("install") / "ComfyUI")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cm_cli", "install", "--mode", "local", git_url],
                            cwd=comfy, env=offline_env(COMFYUI_PATH=str(comfy)), capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    installed = comfy / "custom_nodes" / PACK_NAME
    # cm-cli reports a failed URL install in its output and still exits 0.
    assert result.returncode == 0 and "[INSTALLED]" in output and installed.is_dir(), output[-4000:]
    return {"comfy": comfy, "pack": installed, "output": output, "seconds": time.perf_counter() - started}


@pytest.mark.install
def test_manager_installs_the_committed_head_with_its_requirements(manager_install):
    pack, output = manager_install["pack"], manager_install["output"]
    assert git("rev-parse", "HEAD", cwd=pack) == git("rev-parse", "HEAD", cwd=ROOT)
    assert git("status", "--porcelain", cwd=pack) == "", "the Manager's clone differs from the commit"
    # The Manager runs the pack's requirements.txt through ComfyUI's Python (pip or uv).
    assert re.search(r"'pip',\s+'install',\s+'einops'", output), output[-4000:]
    assert "ERROR" not in output, output[-4000:]


class InstalledComfyServer(ComfyServer):
    """ComfyUI's main.py run from the copied tree, with the custom_nodes the Manager filled."""

    def __init__(self, comfy: Path, extra_args: list[str]):
        super().__init__(comfy, test_nodes=False)
        self.comfy, self.extra_args = comfy, extra_args

    def start(self, timeout: float = 180):
        self.run_main(self.comfy, self.extra_args, timeout, env=offline_env())


def has_builtin_manager(comfy: Path) -> bool:
    return "--enable-manager" in (comfy / "comfy" / "cli_args.py").read_text()


@pytest.fixture(scope="module")
def installed_server(manager_install):
    comfy = manager_install["comfy"]
    extra = ["--enable-manager"] if has_builtin_manager(comfy) else []
    with InstalledComfyServer(comfy, extra) as server:
        yield server


@pytest.mark.install
@pytest.mark.server
def test_installed_pack_registers_every_node(installed_server):
    log = installed_server.log()
    assert re.search(rf"custom_nodes/{PACK_NAME}\s*$", log, re.M), log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    info = installed_server.get("/object_info")
    ours = {name for name, spec in info.items() if spec.get("python_module", "").endswith(PACK_NAME)}
    assert ours == expected_node_ids(), "the installed commit and this working tree define different nodes"
    # What a user reads in the node's info panel: the paper it implements.
    for name in ours:
        assert any(title in info[name]["description"] for title in PAPERS), (name, info[name]["description"])


@pytest.mark.install
@pytest.mark.server
def test_builtin_manager_lists_the_installed_pack(installed_server):
    """ComfyUI versions with a built-in Manager (--enable-manager): it sees the pack as installed
    and imported, with no import failure recorded."""
    if not has_builtin_manager(installed_server.comfy):
        pytest.skip("this ComfyUI has no built-in Manager (no --enable-manager); the pack was installed "
                    "with the same comfyui-manager package's cm-cli")
    log = installed_server.log()
    assert "[ComfyUI-Manager]" in log, log[-3000:]
    # Packs the Manager found at start-up, by folder name: the commit it sees, and enabled.
    imported = installed_server.get("/v2/customnode/installed?mode=imported")
    entry = imported.get(PACK_NAME)
    assert entry and entry["enabled"] and entry["ver"] == git("rev-parse", "HEAD", cwd=ROOT), imported


# --- Comfy Registry ------------------------------------------------------------------------------

def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11 (tomllib)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_has_what_the_registry_shows():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", project["name"]), project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert len(project["description"]) > 20
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy.get(key), key
    # The icon URL points at a file of this repository (on its main branch).
    icon = re.search(r"/main/(.+)$", comfy["Icon"])
    assert icon and (ROOT / icon.group(1)).is_file(), comfy["Icon"]
    # The lower bound is the oldest ComfyUI the suite runs on.
    assert comfy["requires-comfyui"] == ">=0.3.75"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {project['version']}" in changelog


def comfy_cli_python() -> Path:
    """comfy-cli in a virtual environment of its own (created once; ComfyUI's stays as it is)."""
    python = COMFY_CLI_VENV / "bin" / "python"
    COMFY_CLI_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(COMFY_CLI_VENV.parent / ".comfy-cli.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (COMFY_CLI_VENV / "installed").exists():
            shutil.rmtree(COMFY_CLI_VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(COMFY_CLI_VENV)], check=True)
            pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                                  "--disable-pip-version-check", COMFY_CLI], capture_output=True, text=True)
            if pip.returncode != 0:
                pytest.skip(f"could not install {COMFY_CLI} into {COMFY_CLI_VENV}:\n{pip.stderr[-2000:]}")
            (COMFY_CLI_VENV / "installed").write_text(COMFY_CLI)
    return python


@pytest.mark.install
def test_comfy_node_validate_passes_without_warnings(tmp_path):
    python = comfy_cli_python()
    # comfy-cli keeps its settings under $HOME; a fresh one per run, telemetry off, no prompts.
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run([str(python), "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry",
                             "node", "validate"], cwd=ROOT, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert not re.search(r"warning|error", output, re.I), output


@pytest.mark.install
def test_suite_runs_in_a_clone_named_like_the_repository(tmp_path):
    """A user's clone is named after the repository, which is no Python identifier: pytest must not
    import the root's __init__.py by that name (it did, and every test of the suite errored). Run
    through a symlink of that name to the clone (a clone kept elsewhere and linked into
    custom_nodes): pytest then meets the folder by the link's path and the clone's real one, and a
    run straight in the clone takes no path this one does not."""
    clone = tmp_path / PACK_NAME
    for name in git("ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    link = tmp_path / "custom_nodes" / PACK_NAME
    link.parent.mkdir()
    link.symlink_to(clone)
    test = link / "tests" / "test_demo_metrics.py"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", f"{test}::test_label_embedding_is_the_test_nodes"],
                            cwd=tmp_path, env=dict(os.environ, COMFYUI_PATH=str(COMFY)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:]
