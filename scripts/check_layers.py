"""Checks the layering of the code from every module's imports (read with ast, nothing is imported).

Fails (exit 1, one line per violation) when:
- a module under enhance_core/ imports from a higher layer; the layers, lowest first:
  models < patching < measures < sampling < methods, and nodes/ above all of them;
- a module of one method (enhance_core/methods/<name>.py or the package enhance_core/methods/<name>/)
  imports another method's module;
- a module under enhance_core/ sits in no layer (directly in enhance_core/, or in another folder);
- anything in scripts/ or bench/ imports a module from tests/, or puts tests/ on sys.path;
- a module under enhance_core/ is over MAX_LINES lines.

Imports are resolved against the repository root: relative ones (`from ..patching import x`) from the
importing module's package, absolute ones as the tests and scripts write them (`freevideo.enhance_core...`,
the name the pack is imported under, or `enhance_core...`).

Usage: python scripts/check_layers.py [--root PATH]
"""

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("models", "patching", "measures", "sampling", "methods")
NODES_RANK = len(LAYERS)  # nodes/ sits above every layer of enhance_core
CORE = "enhance_core"
PACK_ALIASES = ("freevideo",)  # the name tests and scripts import the pack under
MAX_LINES = 300
SCRIPT_FOLDERS = ("scripts", "bench")


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted module name relative to the repository root (as far as it is known)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(root: Path, path: Path, tree: ast.Module) -> list[Import]:
    """Every module `path` imports, resolved to dotted names from the repository root. For
    `from X import a` the target is X.a where that is a module of the repository, else X."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, _unalias(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                if node.level - 1 > len(base):
                    continue  # beyond the repository root: not one of ours
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = _unalias(node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                found.append(Import(node.lineno, full if alias.name != "*" and is_module(root, full) else base))
    return found


def _unalias(name: str) -> str:
    for alias in PACK_ALIASES:
        if name == alias:
            return ""
        if name.startswith(alias + "."):
            return name[len(alias) + 1:]
    return name


def rank(name: str) -> int | None:
    """The layer rank of a module name (nodes: above all), None outside the layered code."""
    parts = name.split(".")
    if parts[0] == "nodes":
        return NODES_RANK
    if parts[0] == CORE and len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def method_of(name: str) -> str | None:
    """enhance_core.methods.<name>[...] -> <name>; None for the methods package itself or other code."""
    parts = name.split(".")
    if parts[:2] == [CORE, "methods"] and len(parts) > 2:
        return parts[2]
    return None


def _puts_tests_on_path(node: ast.AST) -> bool:
    """A sys.path call or assignment whose arguments name the tests folder (`ROOT / "tests"`)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        target = node.func.value
        args = node.args
    elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Subscript):
        target = node.targets[0].value
        args = [node.value]
    else:
        return False
    is_sys_path = isinstance(target, ast.Attribute) and target.attr == "path" and \
        isinstance(target.value, ast.Name) and target.value.id == "sys"
    return is_sys_path and any(isinstance(c, ast.Constant) and c.value == "tests"
                               for arg in args for c in ast.walk(arg))


def check(root: Path) -> tuple[list[str], int]:
    """(violations, modules checked)."""
    root = root.resolve()
    tests = root / "tests"
    problems = []
    checked = 0
    files = sorted(p for folder in (CORE, "nodes", *SCRIPT_FOLDERS) for p in (root / folder).rglob("*.py")
                   if "__pycache__" not in p.parts)
    for path in files:
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source, filename=rel)
        except SyntaxError as e:
            problems.append(f"{rel}:{e.lineno}: cannot be parsed: {e.msg}")
            continue
        checked += 1
        name = module_name(root, path)
        imports = imports_of(root, path, tree)
        if rel.startswith(CORE + "/"):
            own_rank, own_method = rank(name), method_of(name)
            lines = len(source.splitlines())
            if lines > MAX_LINES:
                problems.append(f"{rel}: {lines} lines, over the limit of {MAX_LINES} for a module under {CORE}/")
            if own_rank is None and path != root / CORE / "__init__.py":
                problems.append(f"{rel}: in no layer (modules under {CORE}/ belong in one of {', '.join(LAYERS)})")
            for imp in imports:
                other = rank(imp.target)
                if own_rank is not None and other is not None and other > own_rank:
                    layer = "nodes" if other == NODES_RANK else LAYERS[other]
                    problems.append(f"{rel}:{imp.line}: layer {LAYERS[own_rank]} imports {imp.target} "
                                    f"from the higher layer {layer}")
                elif own_rank is not None and imp.target == CORE:
                    problems.append(f"{rel}:{imp.line}: imports the {CORE} package itself, above every layer")
                other_method = method_of(imp.target)
                if own_method and other_method and other_method != own_method:
                    problems.append(f"{rel}:{imp.line}: method {own_method} imports {imp.target} "
                                    f"of the method {other_method}")
        elif rel.split("/")[0] in SCRIPT_FOLDERS:
            here = path.parent
            for imp in imports:
                top = imp.target.split(".")[0]
                if not top or is_module(here, top) or is_module(root, top) and top != "tests":
                    continue  # a sibling script, or a package of the repository root other than tests
                if top == "tests" or is_module(tests, top):
                    problems.append(f"{rel}:{imp.line}: imports {imp.target} from tests/")
            for node in ast.walk(tree):
                if _puts_tests_on_path(node):
                    problems.append(f"{rel}:{node.lineno}: puts tests/ on sys.path")
    return problems, checked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root (default: the one this script is in)")
    args = parser.parse_args(argv)
    problems, checked = check(args.root)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} layering violation(s) in {checked} modules", file=sys.stderr)
        return 1
    print(f"layers OK: {checked} modules checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
