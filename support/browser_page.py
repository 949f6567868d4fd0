"""ComfyUI's own frontend (the comfyui-frontend-package its requirements install) in headless
Chromium driven by Playwright, for tests/test_browser.py and scripts that take screenshots.

Chromium comes from the system (Debian's `chromium` package): Playwright's own browser download
needs a network the test machines do not have. `ensure_chromium()` installs it with apt-get where
the process runs as root and it is missing; FREEVIDEO_CHROMIUM names another executable.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1280, "height": 800}

# Settings of a first start that would put something over the graph: the template browser shown
# to new users, the minimap, the canvas statistics (the "Nodes 2.0" banner keeps its dismissal in
# localStorage). Text stays drawn when a whole graph is fitted into the view (no low-detail mode).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}

RUN_BUTTON = '[data-testid="queue-button"]'
# The open workflow (its tab), in the frontend versions ComfyUI 0.3.75 and 0.33 serve.
ACTIVE_WORKFLOW = ("window.comfyAPI?.app?.app?.extensionManager?.workflow?.activeWorkflow"
                   " ?? app.extensionManager?.workflow?.activeWorkflow")
# Dialogs, toasts and banners shown over the canvas: their text.
OVERLAYS = """() => [...document.querySelectorAll('.p-dialog, .p-toast-message, [role=dialog], [role=alertdialog]')]
    .filter(e => e.offsetParent !== null && e.getBoundingClientRect().width > 0)
    .map(e => e.innerText.slice(0, 200))"""


def find_chromium() -> str | None:
    path = os.environ.get("FREEVIDEO_CHROMIUM")
    if path:
        return path if os.access(path, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """(path, "") or (None, why it is missing). Installs Debian's chromium when root with apt-get."""
    path = find_chromium()
    if path:
        return path, ""
    if os.environ.get("FREEVIDEO_CHROMIUM"):
        return None, f"FREEVIDEO_CHROMIUM={os.environ['FREEVIDEO_CHROMIUM']} is not an executable"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, ("no chromium executable (looked for " + ", ".join(CHROMIUM_NAMES) + "); install it, e.g. "
                      "`apt-get install chromium`, or set FREEVIDEO_CHROMIUM")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for attempt in ([install], [["apt-get", "update", "-q"], install]):
        log = ""
        for cmd in attempt:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            log += r.stdout[-1500:] + r.stderr[-1500:]
            if r.returncode:
                break
        path = find_chromium()
        if path:
            return path, ""
    return None, f"chromium is missing and `apt-get install chromium` failed:\n{log}"


def write_settings(base: Path) -> None:
    """The user settings a ComfyServer with base directory `base` starts with."""
    folder = Path(base) / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps(SETTINGS))


class ComfyPage:
    """One browser tab on a ComfyUI server, used as a user would: drop files, press Run."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, timeout_s: float = 120) -> None:
        self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page.goto(self.url)
        # Ready: the node types registered, the start-up workflow open, the Run button shown.
        self.page.wait_for_function(
            "() => window.app?.canvas?.graph && window.LiteGraph"
            " && Object.keys(LiteGraph.registered_node_types).length > 50"
            f" && ({ACTIVE_WORKFLOW}) && document.querySelector('{RUN_BUTTON}')?.offsetParent",
            timeout=timeout_s * 1000)
        # Count the page's graph loads (a dropped file is one), so that drop_file can wait for
        # the end of its load: what follows the graph's nodes (dialogs, the workflow's tab) is async.
        self.page.evaluate(
            """() => {
                if (window.__freevideo_loads) return;
                const loads = window.__freevideo_loads = {started: 0, finished: 0};
                const load = app.loadGraphData;
                app.loadGraphData = async function (...args) {
                    loads.started++;
                    try { return await load.apply(this, args); } finally { loads.finished++; }
                };
            }""")
        self.settle()
        self.tidy()

    def settle(self) -> None:
        """Two animation frames: what the page marked to redraw before has been drawn."""
        self.page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")

    def drop_file(self, name: str, text: str, timeout_s: float = 30) -> list[dict]:
        """Drop a workflow file onto the canvas (a DataTransfer with one File, as a drag from the
        desktop delivers it) and wait until the graph holds exactly the file's nodes and the page has
        finished loading it."""
        workflow = json.loads(text)
        want = sorted(f"{n['id']}:{n['type']}" for n in workflow["nodes"])
        loaded = self.page.evaluate("() => window.__freevideo_loads.finished")
        transfer = self.page.evaluate_handle(
            "([name, text]) => { const dt = new DataTransfer();"
            " dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }", [name, text])
        self.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": transfer})
        # Polled on a timer, not on animation frames: the page draws the new graph meanwhile, and
        # those frames are slow in a headless browser on 2 cores (up to a tenth of a second).
        self.page.wait_for_function(
            """([want, before]) => { const loads = __freevideo_loads;
                return loads.finished > before && loads.started === loads.finished
                    && JSON.stringify(app.graph.nodes.map(n => `${n.id}:${n.type}`).sort()) === JSON.stringify(want); }""",
            arg=[want, loaded], timeout=timeout_s * 1000, polling=20)
        return self.nodes()

    def nodes(self) -> list[dict]:
        """Every node of the page's graph: id, type, title, whether the page knows its type, and
        its widgets (name, value) in the page's order."""
        return self.page.evaluate(
            """() => app.graph.nodes.map(n => ({
                id: Number(n.id), type: n.type, title: n.title, mode: n.mode,
                known: !!LiteGraph.registered_node_types[n.type],
                widgets: (n.widgets || []).map(w => [w.name, w.value]),
            }))""")

    def active_workflow_name(self) -> str:
        return self.page.evaluate(f"() => ({ACTIVE_WORKFLOW})?.filename ?? null")

    def graph_to_prompt(self) -> dict:
        """The API prompt the page would queue for the graph (its own conversion)."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def tidy(self) -> None:
        """Close whatever dialog, toast or banner lies over the canvas; fail if one stays."""
        page = self.page
        for _ in range(4):
            closers = page.locator(".p-dialog-close-button:visible, .p-toast-close-button:visible, "
                                   ".p-toast-icon-close:visible, .p-message-close:visible")
            if closers.count() == 0:
                break
            for i in range(closers.count() - 1, -1, -1):
                try:
                    closers.nth(i).click(timeout=2000, force=True)
                except Exception:  # noqa: BLE001 - it may have closed itself meanwhile
                    pass
            self._overlays_gone()
        page.keyboard.press("Escape")
        if not self._overlays_gone():
            left = page.evaluate(OVERLAYS)
            assert not left, f"still over the canvas after closing: {left}"

    def _overlays_gone(self, timeout_s: float = 2) -> bool:
        """Wait until no dialog or toast shows (they close with a short transition); False if one
        still does after `timeout_s`."""
        try:
            self.page.wait_for_function(f"() => ({OVERLAYS})().length === 0", polling=20, timeout=timeout_s * 1000)
            return True
        except Exception:  # noqa: BLE001 - a timeout
            return False

    def fit_view(self) -> None:
        """What the '.' key does on the canvas (Comfy.Canvas.FitView), until the view is still."""
        # The command moves the view in steps, one per animation frame, over 350 ms (LiteGraph's
        # DragAndScale.animateToBounds): here it takes the last step at once, the same view, and the
        # steps are counted. Two frames without a step: the canvas has drawn the final view.
        self.page.evaluate(
            """() => {
                const ds = app.canvas.ds, fit = window.__freevideo_fit = {steps: 0, seen: -1, still: 0};
                ds.animateToBounds = function (bounds, step, options = {}) {
                    delete ds.animateToBounds;
                    return ds.animateToBounds(bounds, () => { fit.steps++; step(); }, {...options, duration: 1});
                };
            }""")
        self.page.focus("#graph-canvas")
        self.page.keyboard.press(".")
        try:
            self.page.wait_for_function(
                """() => { const fit = __freevideo_fit;
                           fit.still = fit.steps > 0 && fit.steps === fit.seen ? fit.still + 1 : 0;
                           fit.seen = fit.steps; return fit.still >= 2; }""", polling="raf", timeout=10_000)
        except Exception as e:  # noqa: BLE001 - a timeout, said plainly
            steps = self.page.evaluate("() => { delete app.canvas.ds.animateToBounds; return __freevideo_fit.steps; }")
            raise AssertionError(f"the '.' key did not fit the view ({steps} steps of its animation)") from e

    def press_on_nodes(self, ids: list[int], keys: str) -> None:
        """Select nodes `ids` on the canvas (only them) and press `keys` there: Control+b bypasses
        them (or, when all are bypassed, turns them back on), Control+m mutes them (or unmutes)."""
        if not ids:
            return
        before = self.page.evaluate(
            "(ids) => { const nodes = ids.map(id => app.graph.getNodeById(id)); app.canvas.selectNodes(nodes);"
            " document.querySelector('#graph-canvas').focus(); return nodes.map(n => n.mode); }", ids)
        self.page.keyboard.press(keys)
        try:
            self.page.wait_for_function(
                "([ids, before]) => ids.some((id, i) => app.graph.getNodeById(id).mode !== before[i])",
                arg=[ids, before], polling=20, timeout=5000)
        except Exception as e:  # noqa: BLE001 - a timeout, said plainly
            raise AssertionError(f"{keys} on nodes {ids} (modes {before}) changed no mode") from e

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), scale="css")
        return path

    def start_listening(self) -> None:
        """Record the execution events the page's own API client receives over its websocket."""
        self.page.evaluate(
            """() => {
                const api = window.comfyAPI?.api?.api ?? app.api;
                window.__freevideo_events = [];
                if (window.__freevideo_listening) return;
                window.__freevideo_listening = true;
                for (const type of ['execution_start', 'executed', 'execution_success', 'execution_error',
                                    'execution_interrupted'])
                    api.addEventListener(type, e => window.__freevideo_events.push({type, detail: e.detail}));
            }""")

    def press_run(self, timeout_s: float = 30) -> tuple[str, dict]:
        """Press the Run (queue) button; return the prompt id the server gave and the prompt the
        page sent."""
        button = self.page.locator(f"{RUN_BUTTON}:visible").first
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                       timeout=timeout_s * 1000) as response:
            button.click()
        r = response.value
        body = r.json()
        assert r.ok, f"POST /prompt from the page -> {r.status}: {body}"
        return body["prompt_id"], json.loads(r.request.post_data)["prompt"]

    def wait_finished(self, prompt_id: str, timeout_s: float = 240) -> list[dict]:
        """Wait until the page has seen the prompt succeed or fail; return its events."""
        started = time.time()
        self.page.wait_for_function(
            """(id) => window.__freevideo_events.some(e => e.detail?.prompt_id === id &&
                    ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))""",
            arg=prompt_id, timeout=timeout_s * 1000, polling=50)
        events = self.page.evaluate("(id) => window.__freevideo_events.filter(e => e.detail?.prompt_id === id)", prompt_id)
        self.elapsed = time.time() - started
        return events
