"""Test set-up: a real ComfyUI (COMFYUI_PATH, default the embedded .runtime/ComfyUI) imported in
process, CPU and PyTorch SDPA attention as on GPUs, and the pack imported as package `freevideo`.
The helpers live in the repository root's `support` package."""

import gc
import os
import sys
from pathlib import Path

import pytest

# One torch thread per test process unless FREEVIDEO_TEST_THREADS says otherwise. The tiny models'
# operations are small, and on 2 cores shared with other work a second thread that waits for a busy
# core made sampling of the tiny Wan 2.5-4.6x slower. Set in the environment before torch is
# imported, so that the ComfyUI servers and scripts the tests start use it too.
THREADS = os.environ.get("FREEVIDEO_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS

# Appended, not prepended: the root holds the pack's `nodes` package, which must not shadow
# ComfyUI's nodes.py (in_process.setup puts ComfyUI first).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
from support import in_process  # noqa: E402


def _runs_tests(config) -> bool:
    """Whether this process runs tests: a pytest-xdist worker, or pytest without -n. The process that
    only hands files to the workers never imports ComfyUI (10-15 s the workers would wait for)."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


class _RootIsAPlainFolder:
    """The repository root is ComfyUI's custom-node package (its __init__.py imports the nodes
    relatively). pytest would collect it as a test package and import that __init__.py by the folder's
    name, which fails for every test where the clone's folder name is no Python identifier (a clone
    named ComfyUI-FreeVideo). The tests import the pack themselves (in_process), so the root is
    collected as a plain folder. A plugin, not a conftest hook: conftests are not asked about the
    folder they sit in or above. pytest's path may go through a symlink, ROOT does not."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path.resolve() == in_process.ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RootIsAPlainFolder(), "freevideo-root-folder")
    if _runs_tests(config):
        in_process.setup()
        import torch
        torch.set_num_threads(int(THREADS))


# The longest files first (measured on 2 cores, ComfyUI 0.33 and 0.3.75): the test processes of
# scripts/test.sh take one file at a time in this order, and a long file taken last would run alone
# at the end. The files not named here are short (under 25 s each).
LONGEST_FIRST = ("test_browser.py", "test_torch_compile.py", "test_entropy_editing.py", "test_install.py",
                 "test_robustness.py", "test_peer_packs.py", "test_core_stacking.py", "test_entropy_guidance.py",
                 "test_server_end_to_end.py", "test_hook_layer.py", "test_feature_accumulation.py",
                 "test_enhance_a_video.py", "test_masked_editing.py", "test_editing_graphs.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def pytest_collection_finish(session):
    # ComfyUI, torch, the pack and the test modules leave ~400,000 long-lived objects once imported.
    # Frozen, they are left out of every later full garbage collection (ComfyUI runs one before each
    # model load while it suspects a leaked model): 0.37 s each before, under 1 ms after.
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def wan21():
    from support import tiny_models
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())


@pytest.fixture(autouse=True)
def _forget_dead_model_entries():
    """After each test, drop ComfyUI's loaded-model entries whose patcher was released while its
    model lives on (a clone of a clone, collected as a reference cycle, cannot hand its entry to its
    parent). ComfyUI never drops such an entry itself while the model lives (the session's tiny Wan
    does), and with one present it runs a full garbage collection before every model load: 186
    collections, 70 s of the EVS tests after the editing tests."""
    yield
    import comfy.model_management
    loaded = comfy.model_management.current_loaded_models
    loaded[:] = [entry for entry in loaded if not entry.is_dead()]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One ComfyUI server (its own main.py with the pack and the test nodes; tiny Wan 2.1 and its
    VAE) for the tests that only queue prompts and read results. Tests that interrupt a server,
    count its model calls, compare against a fresh one or install other packs start their own."""
    from support import tiny_models
    from support.comfy_server import ComfyServer
    models = {"diffusion_models": [tiny_models.wan21_t2v()], "vae": [tiny_models.wan21_vae()]}
    with ComfyServer(tmp_path_factory.mktemp("comfy"), models=models) as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def _release_family_models():
    # The family models are shared by the whole session; let their patchers go while ComfyUI is
    # still whole (their __del__ needs it).
    yield
    from support import families
    families.release()
