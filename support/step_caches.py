"""The step-cache packs users stack with ours (ComfyUI-TeaCache, ComfyUI-MagCache), imported into
this process from their unmodified snapshots, and counters of the model calls they let run.

The snapshots come from FREEVIDEO_PEERS (default ../shared/peers beside the repository), as
<pack>-<commit>.tar.gz. Only each pack's nodes.py is imported (its node classes): the packs'
__init__.py also imports their diffusers nodes, which need a package the tests do not.
"""

import atexit
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("FREEVIDEO_PEERS", ROOT.parent / "shared" / "peers"))

_extracted = {}


class Unavailable(Exception):
    """The pack cannot be used here; the message says why (for a test's skip)."""


def load_pack(pack: str):
    """The nodes module of `pack` ("ComfyUI-TeaCache"), imported once per process from its snapshot.
    Raises Unavailable where the snapshot is absent or does not import on this ComfyUI."""
    if pack in _extracted:
        found = _extracted[pack]
        if isinstance(found, Unavailable):
            raise found
        return found
    try:
        module = _import(pack)
    except Unavailable as e:
        _extracted[pack] = e
        raise
    _extracted[pack] = module
    return module


def _import(pack: str):
    tarballs = sorted(PEERS.glob(f"{pack}-*.tar.gz"))
    if not tarballs:
        raise Unavailable(f"peer pack {pack} not found: no {pack}-*.tar.gz in {PEERS} (set FREEVIDEO_PEERS to the "
                          "folder holding the peer pack snapshots)")
    dest = Path(tempfile.mkdtemp(prefix="freevideo-peers-"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    with tarfile.open(tarballs[-1]) as tf:
        tf.extractall(dest, filter="data")
    # The snapshot's top folder is the pack's name, with or without its commit.
    sources = sorted(dest.glob(f"{pack}*/nodes.py"))
    if len(sources) != 1:
        raise Unavailable(f"{tarballs[-1].name} has no single {pack}*/nodes.py")
    source = sources[0]
    name = "freevideo_peer_" + pack.replace("-", "_").lower()
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        # A user's ComfyUI fails to load the pack the same way (it imports ComfyUI internals by name).
        raise Unavailable(f"{tarballs[-1].name} does not import on this ComfyUI ({type(e).__name__}: {e}); "
                          "ComfyUI would list it as IMPORT FAILED") from None
    sys.modules[name] = module
    return module


class CallCounter:
    """Counts a diffusion model's calls (a module that runs on every call, skipped or not) and the
    calls that ran its blocks (a module inside the last block), with PyTorch forward pre-hooks on
    the shared modules: hooked copies that object patches put in their place share the hooks.
    Removed on exit."""

    def __init__(self, every_call, in_blocks):
        self.modules = {"calls": every_call, "computed": in_blocks}
        self.counts = dict.fromkeys(self.modules, 0)

    @property
    def calls(self) -> int:
        return self.counts["calls"]

    @property
    def computed(self) -> int:
        return self.counts["computed"]

    @property
    def skipped(self) -> int:
        return self.calls - self.computed

    def __enter__(self):
        def counter(name):
            def hook(*_):
                self.counts[name] += 1
            return hook
        self.handles = [m.register_forward_pre_hook(counter(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
