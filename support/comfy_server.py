"""Runs ComfyUI's own main.py as a user would, with the pack installed, and talks to it over HTTP.

Everything lives under a base directory of its own (--base-directory): custom_nodes holds links to
the pack, to the test-only nodes and to other packs a test installs beside it, models/ links to
tiny model files, output/ receives results.
The ComfyUI tree itself (embedded, or COMFYUI_PATH) is never modified.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from support.in_process import COMFY, ROOT

PACK_NAME = "ComfyUI-FreeVideo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, models: dict[str, list[Path]] | None = None, test_nodes: bool = True,
                 output_dir: Path | None = None, custom_nodes: dict[str, Path] | None = None):
        """custom_nodes: other node packs to install beside this one, folder name -> pack directory."""
        self.base = Path(base_dir)
        self.custom_nodes = custom_nodes or {}
        self.output_dir = Path(output_dir) if output_dir else self.base / "output"
        self.models = models or {}
        self.test_nodes = test_nodes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = self.base / "server.log"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _link(self, target: Path, link: Path):
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def start(self, timeout: float = 180):
        self._link(ROOT, self.base / "custom_nodes" / PACK_NAME)
        if self.test_nodes:
            self._link(ROOT / "tests" / "comfy_test_nodes", self.base / "custom_nodes" / "freevideo_test_nodes")
        for name, pack in self.custom_nodes.items():
            self._link(Path(pack).resolve(), self.base / "custom_nodes" / name)
        for folder, files in self.models.items():
            for f in files:
                self._link(Path(f).resolve(), self.base / "models" / folder / Path(f).name)
        # No API nodes (the paid cloud nodes): nothing here uses them, and loading them is a tenth of a
        # start. A user's install keeps them (test_install starts ComfyUI without this flag).
        self.run_main(COMFY, ["--base-directory", str(self.base), "--output-directory", str(self.output_dir),
                              "--disable-api-nodes"], timeout)

    def run_main(self, comfy: Path, extra_args: list[str], timeout: float, env: dict | None = None):
        """Start `comfy`'s main.py on this server's port (CPU, SDPA) and wait until it answers."""
        cmd = [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--disable-auto-launch",
               "--listen", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt, wait for it, return its history entry; raise on failure."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'), indent=1)[:4000]}")
                return entry
            time.sleep(0.02)  # a tiny model's prompt takes well under a second
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def output_files(self, entry: dict) -> list[Path]:
        files = []
        for node_out in entry["outputs"].values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        folder = self.output_dir if item.get("type", "output") == "output" else self.base / item["type"]
                        files.append(folder / item.get("subfolder", "") / item["filename"])
        return files
