"""The package stays readable: no function grows past a page, and `run_train` reads in one sitting.
Measured with an `ast` walk over transfer_cli/ (a function's length: its first line, decorators
excluded, to its last, docstring and comments included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "transfer_cli"
MAX_FUNCTION_LINES = 80
MAX_RUN_TRAIN_LINES = 60


def function_lengths() -> dict[str, int]:
    """``module:qualified.name`` -> lines, for every function and method in the package."""
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, module: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[f"{module}:{name}"] = child.end_lineno - child.lineno + 1
                walk(child, module, f"{name}.")

    for path in sorted(PACKAGE.rglob("*.py")):
        walk(ast.parse(path.read_text(), str(path)), str(path.relative_to(PACKAGE.parent)), "")
    return lengths


def test_the_walk_sees_every_function():
    lengths = function_lengths()
    assert len(lengths) > 300
    assert lengths["transfer_cli/engine/validators.py:entropy"] == 3


def test_no_function_is_longer_than_a_page():
    too_long = {name: n for name, n in function_lengths().items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_run_train_reads_in_one_sitting():
    assert function_lengths()["transfer_cli/train.py:run_train"] <= MAX_RUN_TRAIN_LINES
