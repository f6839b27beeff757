"""House rules checked on the source: the package's layers, lowest first (a module imports only its own layer or
lower ones, lazy imports inside functions included; medgpt/__init__.py lists them), and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "medgpt"
LAYERS = [
    ("utils/config", ["__init__", "utils", "config", "outdir"]),
    ("args", ["args"]),
    ("model", ["model"]),
    ("data", ["data"]),
    ("train", ["train"]),
    ("scratch", ["scratch"]),
    ("stages and infer", ["stages", "infer"]),
    ("rag and eval", ["rag", "eval"]),
    ("serve", ["serve"]),
    ("pipeline and cli", ["pipeline", "report", "cli"]),
]
LAYER = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def layer_of(module: str) -> int:
    """The layer of a dotted medgpt module name (medgpt.data.formats -> data)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYER, f"medgpt.{top} has no layer: add it to LAYERS (and to the README layout)"
    return LAYER[top]


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, medgpt module) for every import in a file, at any depth."""
    name = "medgpt." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "medgpt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..data import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "medgpt":
                found += [(node.lineno, f"{module}.{a.name}" if module == "medgpt" and _is_module(a.name) else module)
                          for a in node.names]
    return found


def test_every_module_imports_only_its_layer_or_lower():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        here = "medgpt." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mine = layer_of(here.removesuffix(".__init__"))
        for line, module in imports(path):
            if layer_of(module) > mine:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({LAYERS[mine][0]}) imports {module} "
                             f"({LAYERS[layer_of(module)][0]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """A test that cannot fail is a defect: the walker finds an import inside a function, and a relative one."""
    pkg = ROOT / "data"
    found = dict((m, n) for n, m in imports(pkg / "commands.py"))
    assert any(m.startswith("medgpt.") for m in found)
    assert layer_of("medgpt.eval.rouge") > layer_of("medgpt.infer.engine") > layer_of("medgpt.data.formats")


def test_no_function_is_longer_than_80_lines():
    """A function that outgrows a screen is split into named parts (README "Layout")."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
