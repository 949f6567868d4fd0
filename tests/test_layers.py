"""scripts/check_layers.py: on a small synthetic tree with known violations (the checker itself), and
on this repository (the layering of the code)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / "scripts" / "check_layers.py"


def run_checker(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECKER), "--root", str(root)], capture_output=True, text=True, timeout=60)


def write_tree(root: Path, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# Imports every rule allows: lower layers, the own layer, the own method's package, ComfyUI and
# torch, support/ and sibling scripts from scripts/ and bench/.
CLEAN = {
    "enhance_core/__init__.py": '"""The core."""\n',
    "enhance_core/models/__init__.py": "import torch\n",
    "enhance_core/models/wan.py": "from . import adapter\n",
    "enhance_core/models/adapter.py": "",
    "enhance_core/patching/__init__.py": "",
    "enhance_core/patching/attention_slot.py": "from ..models import wan\nfrom ..models.adapter import X\n",
    "enhance_core/patching/layer_routing.py": "from .attention_slot import add\nimport comfy.model_patcher\n",
    "enhance_core/measures/__init__.py": "",
    "enhance_core/measures/entropy.py": "from ..patching import layer_routing\n",
    "enhance_core/sampling/__init__.py": "",
    "enhance_core/sampling/branches.py": "from freevideo.enhance_core.measures.entropy import e\n",
    "enhance_core/methods/__init__.py": "",
    "enhance_core/methods/guidance.py": "from ..sampling import branches\nfrom ..models import wan\n",
    "enhance_core/methods/evs/__init__.py": "from .sampler import evs_sample\n",
    "enhance_core/methods/evs/sampler.py": "from . import bridge\nfrom ...sampling.branches import b\n",
    "enhance_core/methods/evs/bridge.py": "from ..evs import sampler\n",
    "nodes/__init__.py": "",
    "nodes/guidance.py": "from ..enhance_core.methods.guidance import g\nimport nodes\n",
    "scripts/demo.py": "import sys\nsys.path.append(str(ROOT))\nimport demo_metrics\nfrom support import tiny_models\n",
    "scripts/demo_metrics.py": "import torch\n",
    "bench/bench_x.py": "from support.sampling import ksample\nfrom freevideo.enhance_core.methods.guidance import g\n",
    "support/__init__.py": "",
    "support/tiny_models.py": "",
    "tests/test_families.py": "",
    "tests/comfy_test_nodes/__init__.py": "",
}


def test_clean_synthetic_tree_passes(tmp_path):
    write_tree(tmp_path, CLEAN)
    result = run_checker(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "layers OK" in result.stdout


def test_each_violation_is_listed(tmp_path):
    write_tree(tmp_path, {
        **CLEAN,
        # higher layers, relative (resolved from the importing package) and absolute
        "enhance_core/models/wan.py": "from . import adapter\nfrom ..patching.attention_slot import add\n",
        "enhance_core/patching/layer_routing.py": "def f():\n    from ..methods import guidance\n",
        "enhance_core/measures/entropy.py": "import freevideo.enhance_core.sampling.branches\n",
        "enhance_core/sampling/branches.py": "from ...nodes import guidance\n",
        "enhance_core/measures/other.py": "from .. import methods\n",
        # one method importing another (module and package)
        "enhance_core/methods/guidance.py": "from .evs.sampler import evs_sample\n",
        "enhance_core/methods/evs/bridge.py": "from .. import guidance\n",
        # a stray module and a long one
        "enhance_core/helpers.py": "",
        "enhance_core/sampling/ddim.py": "x = 1\n" * 301,
        # scripts and benchmarks reaching into tests/
        "scripts/demo.py": 'import sys\nsys.path.insert(0, str(ROOT / "tests"))\nimport test_families\n',
        "bench/bench_x.py": "from tests.comfy_test_nodes import X\nimport comfy_test_nodes\n",
    })
    result = run_checker(tmp_path)
    assert result.returncode == 1
    found = set(result.stdout.splitlines())
    expected = {
        "enhance_core/models/wan.py:2: layer models imports enhance_core.patching.attention_slot from the higher layer patching",
        "enhance_core/patching/layer_routing.py:2: layer patching imports enhance_core.methods.guidance from the higher layer methods",
        "enhance_core/measures/entropy.py:1: layer measures imports enhance_core.sampling.branches from the higher layer sampling",
        "enhance_core/sampling/branches.py:1: layer sampling imports nodes.guidance from the higher layer nodes",
        "enhance_core/measures/other.py:1: layer measures imports enhance_core.methods from the higher layer methods",
        "enhance_core/methods/guidance.py:1: method guidance imports enhance_core.methods.evs.sampler of the method evs",
        "enhance_core/methods/evs/bridge.py:1: method evs imports enhance_core.methods.guidance of the method guidance",
        "enhance_core/helpers.py: in no layer (modules under enhance_core/ belong in one of models, patching, measures, "
        "sampling, methods)",
        "enhance_core/sampling/ddim.py: 301 lines, over the limit of 300 for a module under enhance_core/",
        "scripts/demo.py:2: puts tests/ on sys.path",
        "scripts/demo.py:3: imports test_families from tests/",
        "bench/bench_x.py:1: imports tests.comfy_test_nodes from tests/",
        "bench/bench_x.py:2: imports comfy_test_nodes from tests/",
    }
    assert found == expected, "\n".join(sorted(found ^ expected))


def test_module_of_exactly_max_lines_passes(tmp_path):
    write_tree(tmp_path, {**CLEAN, "enhance_core/sampling/ddim.py": "x = 1\n" * 300})
    assert run_checker(tmp_path).returncode == 0


def test_this_repository_keeps_its_layers():
    result = run_checker(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
