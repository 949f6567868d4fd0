"""Test set-up: a real ComfyUI (COMFYUI_PATH, default the embedded .runtime/ComfyUI) imported in
process, CPU and PyTorch SDPA attention as on GPUs, and the pack imported as package `freevideo`.
The helpers live in the repository root's `support` package."""

import sys
from pathlib import Path

import pytest

# Appended, not prepended: the root holds the pack's `nodes` package, which must not shadow
# ComfyUI's nodes.py (in_process.setup puts ComfyUI first).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
from support import in_process  # noqa: E402

in_process.setup()


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


@pytest.fixture(scope="session")
def wan21():
    from support import tiny_models
    return tiny_models.load_diffusion_model(tiny_models.wan21_t2v())


@pytest.fixture(scope="session", autouse=True)
def _release_family_models():
    # The family models are shared by the whole session; let their patchers go while ComfyUI is
    # still whole (their __del__ needs it).
    yield
    from support import families
    families.release()
