"""The package's layers: every import goes down the data flow, never up, and `import nanopali` stays light.

    config, siglip_config, registry, paths, errors, devices  <  nn, io, inputs  <  models  <  inference  <  tasks
    <  pipeline, zero_shot  <  train  <  serve  <  cli  <  world

A module may import its own layer and the ones before it. The model files are plain PyTorch (they never
import the inference runtime), and nothing but the world itself imports the toy world. The server (serve/) sits
beside the CLI on top of the pipeline; the CLI's `serve` command starts it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanopali"
LAYERS = [("errors", "json_files", "config", "siglip_config", "registry", "paths", "devices"), ("nn", "io", "inputs"), ("models",),
          ("inference",), ("tasks",), ("pipeline", "zero_shot"), ("train",), ("serve",), ("cli",), ("world",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, module: str | None = None) -> set[str]:
    """Every nanopali module a file imports, at the top or inside a function (relative imports resolved);
    `module`: the file's dotted name (default: from its place in the package)."""
    names, here = set(), (module or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            names |= {target} | {f"{target}.{a.name}" for a in node.names}
    return {n for n in names if n == "nanopali" or n.startswith("nanopali.")}


def rank_of(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py" and p.parent != PACKAGE or p.stem in RANK)


def test_every_module_is_in_a_layer():
    top = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert top - {"__init__", "__main__"} == set(RANK), "a new top-level module needs a place in LAYERS"


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_never_go_up(path):
    rank = rank_of(module_name(path))
    upward = sorted(m for m in imported(path) if (r := rank_of(m)) is not None and r > rank)
    assert not upward, f"{module_name(path)} (layer {LAYERS[rank]}) imports from later layers: {upward}"


def test_the_models_are_plain_pytorch():
    for path in (PACKAGE / "models").rglob("*.py"):
        assert not {m for m in imported(path) if m.startswith("nanopali.inference")}, path.name


def test_the_layer_check_can_fail(tmp_path):
    """The parser sees an upward import inside a function, relative and absolute."""
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from ..inference import decode\n    import nanopali.world.scenes\n")
    found = imported(bad, module="nanopali.models.probe")
    assert {"nanopali.inference.decode", "nanopali.world.scenes"} <= found
    assert max(rank_of(m) for m in found) > RANK["models"]


def test_import_nanopali_loads_neither_training_nor_the_world_nor_the_server():
    code = ("import sys, nanopali; print(sorted(m for m in sys.modules "
            "if m.startswith(('nanopali.train', 'nanopali.world', 'nanopali.cli', 'nanopali.serve', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import nanopali also imported {out}"
