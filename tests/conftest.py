from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from rich.console import Console

from transfer_cli.cli import conf_dir
from transfer_cli.config import register_schemas

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the two cores: one thread each (and their children)
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test (with the reason) when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared real data/weights folder next to the repo")
    return path


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """`transfer train overrides` into ``run_dir`` without a subprocess (for module-scoped fixtures)."""
    from transfer_cli.train import run_train

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        return run_train(cfg, run_dir, Console(file=io.StringIO()))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _same_threads_for_every_test():
    """trainer.threads=N sets the process's torch threads: give the next test the count it started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg():
    """Compose a config the way `transfer train` does, for in-process tests."""

    def _compose(*overrides: str, config_name: str = "config") -> DictConfig:
        register_schemas()
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def entry(group: str, name: str, **overrides) -> dict:
    """A registry entry's config as its YAML under conf/GROUP/ defines it (the only place its defaults live),
    with ``overrides`` applied."""
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{name}.yaml")), **overrides}


def build_method(name: str, model, **overrides):
    """The registered method ``name`` on ``model``, configured by its YAML plus ``overrides``."""
    from transfer_cli.methods.base import METHODS

    return METHODS.build(entry("method", name, **overrides), model=model)


def classifier(backbone, num_classes: int, spec):
    """A Classifier for ``backbone`` with placeholder class names, for tests about mechanics."""
    from transfer_cli.config import HeadConfig
    from transfer_cli.models.backbone import Classifier
    from transfer_cli.models.recipe import ModelRecipe

    recipe = ModelRecipe(backbone=backbone.name, weights="none", data_channels=backbone.channels,
                         classes=[str(i) for i in range(num_classes)], input=spec, head=HeadConfig())
    return Classifier(backbone, recipe)


@pytest.fixture
def transfer(monkeypatch, capsys, tmp_path):
    """The real CLI entry point, run in this process (no interpreter start-up) inside ``tmp_path``:
    ``transfer("train", ...)`` -> (exit code, stdout, stderr)."""
    from transfer_cli.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")

    def _run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["transfer", *args])
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def run_folders(root: Path) -> list[Path]:
    """Every run folder (one holding a config.yaml or error.json) under ``root``/outputs/runs."""
    runs = root / "outputs" / "runs"
    return sorted(p for p in runs.glob("*/*") if p.is_dir()) if runs.is_dir() else []
