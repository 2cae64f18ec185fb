"""The architecture holds: import contracts, no circles, the package root and module sizes, no private names of
other packages, the library free of CLI code, every study script's --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """No import cycle, no upward import, the library never imports the CLI (pyproject.toml contracts)."""
    # through the interpreter, not the lint-imports script: a fresh environment may not have it on PATH yet
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_importing_the_library_pulls_no_cli_module():
    code = "import rr_alloc, sys; print([m for m in sys.modules if m.startswith('rr_alloc.cli')])"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


PACKAGE = ROOT / "rr_alloc"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_import_circle_even_through_annotations():
    """Not one module imports another that imports it back, annotation-only imports included."""
    import grimp

    graph = grimp.build_graph("rr_alloc", exclude_type_checking_imports=False)
    circles = sorted(
        {
            tuple(sorted((m, imp)))
            for m in graph.modules
            for imp in graph.find_modules_directly_imported_by(m)
            if graph.chain_exists(importer=imp, imported=m)
        }
    )
    assert circles == []


def test_the_package_root_is_small_and_modules_and_functions_are_short():
    import ast

    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 8, root
    long_modules = [str(p.relative_to(ROOT)) for p in _modules() if len(p.read_text().splitlines()) > 400]
    assert long_modules == []
    long_functions = [
        f"{p.relative_to(ROOT)}:{n.name}"
        for p in _modules()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60
    ]
    assert long_functions == []


def test_no_private_name_of_another_package():
    """``x._name`` is never read from another package's module or class (only from our own objects)."""
    import ast

    ours = {"self", "cls"}
    hits = []
    for p in _modules():
        tree = ast.parse(p.read_text())
        imported = {
            alias.asname or alias.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and not (isinstance(n, ast.ImportFrom) and n.level)
            for alias in n.names
        }
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Attribute)
                and n.attr.startswith("_")
                and not n.attr.startswith("__")
                and isinstance(n.value, ast.Name)
                and n.value.id in imported - ours
            ):
                hits.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.value.id}.{n.attr}")
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and not n.level and any(a.name.startswith("_") for a in n.names):
                hits.append(f"{p.relative_to(ROOT)}:{n.lineno} from {n.module} import _...")
    assert hits == []


# the study scripts (modules the scripts import, such as common.py or a model factory, have no main block)
STUDIES = sorted(p for p in (ROOT / "studies").glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_script_answers_help(script):
    r = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
