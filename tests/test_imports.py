"""The package's import structure: every module imports on its own, nothing imports in a circle, and
no layer imports a layer above it (the import-linter contract in pyproject.toml)."""

import importlib
import multiprocessing
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "transfer_cli"
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")
)


def _import_alone(module: str) -> str | None:
    """In a forked child: forget every transfer_cli module, import ``module`` first; the error, if any."""
    for name in [n for n in sys.modules if n == "transfer_cli" or n.startswith("transfer_cli.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - reported by the test
        return f"{module}: {type(err).__name__}: {err}"
    return None


@pytest.mark.slow  # fresh interpreters: import order is checked in full runs; the in-process cycle check stays fast
def test_every_module_imports_on_its_own_first():
    """Each module, imported before any other transfer_cli module, works. Children are forked from a
    process that already imported the third-party libraries (torch alone takes seconds to import here),
    and forget every transfer_cli module before each import, so only our own import order is tested."""
    for heavy in ("torch", "torchvision", "hydra", "pandas", "sklearn", "matplotlib.pyplot", "rich", "safetensors"):
        importlib.import_module(heavy)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        failed = [err for err in pool.map(_import_alone, MODULES) if err]
    assert len(MODULES) > 40
    assert not failed, failed


@pytest.mark.slow  # fresh interpreters: import order is checked in full runs; the in-process cycle check stays fast
def test_a_fresh_interpreter_imports_the_lowest_and_the_top_module():
    for module in ("transfer_cli.optim", "transfer_cli.cli"):  # optim: the module that once failed alone
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every module that can reach itself through imports, with one such path."""
    found = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                found.append([module, *chain])
                break
    return found


def test_the_package_has_no_import_circle():
    graph = grimp.build_graph("transfer_cli")
    assert len(graph.modules) == len(MODULES)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = grimp.build_graph("transfer_cli")
    graph.add_import(importer="transfer_cli.registry", imported="transfer_cli.optim")  # optim imports registry
    assert any(c[0] == "transfer_cli.optim" or c[0] == "transfer_cli.registry" for c in _cycles(graph))


@pytest.mark.slow  # a fresh interpreter (lint-imports); the in-process cycle check stays fast
def test_layer_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("lint-imports (import-linter) is not installed in this environment: pip install -e '.[dev]'")
    done = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.slow  # fresh interpreters: import order is checked in full runs; the in-process cycle check stays fast
@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--cfg", "job"], ["eval", "--help"]])
def test_inspecting_commands_do_not_import_torch(args, tmp_path):
    """Help and --cfg only read configs: they must start in a fraction of torch's import time."""
    code = ("import sys\nfrom transfer_cli.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "torch imported: False" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
