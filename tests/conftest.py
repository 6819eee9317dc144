from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
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
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[variable] = "1"  # libraries loaded later (scipy's BLAS, the tokenizers' thread pool)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # numpy's BLAS, loaded by now: two threads each made the workers fight for the cores
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test (with the reason) when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared real data/weights folder next to the repo")
    return path


# The preset every test training starts from (conf/trainer/debug.yaml: 2 epochs, no per-step output, no
# plots, a checkpoint every epoch, deterministic kernels); a test adds only the overrides it is about.
DEBUG = "trainer=debug"


@dataclass
class Result:
    """What a command run through the entry point ended with, as a subprocess would report it."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """`transfer ARGS` run in this process by the real entry point (no interpreter start-up), from ``cwd``:
    the one way tests run a command, at any fixture scope. ``run_cli`` starts the real binary instead, for
    tests where the process boundary is the point (exit codes of the installed command, kill -9, torchrun)."""
    from transfer_cli.cli import main

    saved_argv, saved_cwd = sys.argv[:], os.getcwd()
    saved_env = {k: os.environ.get(k) for k in ["COLUMNS", *(env or {})]}
    os.environ.update({"COLUMNS": "200", **(env or {})})
    out, err = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # HYDRA_FULL_ERROR=1 lets the error through, as the binary would print it
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        GlobalHydra.instance().clear()
    return Result(code, out.getvalue(), err.getvalue())


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """`transfer train trainer=debug OVERRIDES` into ``run_dir`` (or the run that ``trainer.resume=PATH``
    continues); returns its summary and fails the test when the run fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    preset = [] if any(o.startswith("trainer=") for o in overrides) else [DEBUG]
    result = invoke("train", *preset, *overrides, f"hydra.run.dir={run_dir}", cwd=run_dir)
    assert result.returncode == 0, result.stderr
    resumed = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.resume=/")]
    return json.loads((Path(resumed[-1]) if resumed else run_dir).joinpath("summary.json").read_text())


def train_with_a_copy_at_epoch(run_dir: Path, copy: Path, epoch: int, monkeypatch, *overrides: str) -> dict:
    """``train_in_process`` into ``run_dir``, copying the folder to ``copy`` right after the training state of
    ``epoch`` is saved: what a kill at that moment leaves on disk, while the run goes on to its end."""
    import shutil

    from transfer_cli.engine import train_state

    save = train_state.save

    def save_and_copy(path, payload):
        save(path, payload)
        if payload["next_epoch"] == epoch:
            shutil.copytree(run_dir, copy)

    monkeypatch.setattr(train_state, "save", save_and_copy)
    try:
        return train_in_process(run_dir, *overrides)
    finally:
        monkeypatch.setattr(train_state, "save", save)


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


def build_method(name: str, model, provided: dict | None = None, **overrides):
    """The registered method ``name`` on ``model``, configured by its YAML plus ``overrides``; ``provided``:
    what the pipeline passes besides the model (distill's opened teachers)."""
    from transfer_cli.methods.base import METHODS

    return METHODS.build(entry("method", name, **overrides), model=model, **(provided or {}))


def classifier(backbone, num_classes: int, spec):
    """A Classifier for ``backbone`` with placeholder class names, for tests about mechanics."""
    from transfer_cli.config import HeadConfig
    from transfer_cli.models.backbone import Classifier
    from transfer_cli.models.recipe import ModelRecipe

    recipe = ModelRecipe(backbone=backbone.name, weights="none", data_channels=backbone.channels,
                         classes=[str(i) for i in range(num_classes)], input=spec, head=HeadConfig())
    return Classifier(backbone, recipe)


@pytest.fixture
def transfer(tmp_path):
    """The real CLI entry point, run in this process inside ``tmp_path``:
    ``transfer("train", ...)`` -> (exit code, stdout, stderr)."""

    def _run(*args: str) -> tuple[int, str, str]:
        result = invoke(*args, cwd=tmp_path)
        return result.returncode, result.stdout, result.stderr

    return _run


def run_folders(root: Path) -> list[Path]:
    """Every run folder (one holding a config.yaml or error.json) under ``root``/outputs/runs."""
    runs = root / "outputs" / "runs"
    return sorted(p for p in runs.glob("*/*") if p.is_dir()) if runs.is_dir() else []
