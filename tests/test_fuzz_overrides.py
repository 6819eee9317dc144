"""Malformed overrides, generated: every one is refused before any work with one paragraph (exit 2),
no traceback and no run folder. 300+ go through what `transfer train` runs before touching data (Hydra's
override parser, the step of its composition that applies value overrides, then validate); a sample also goes
through the real entry point."""

import copy
import string

import pytest
from conftest import run_folders
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from transfer_cli.cli import conf_dir
from transfer_cli.config import register_schemas
from transfer_cli.errors import UserError
from transfer_cli.validation import validate

BAD_TOKENS = ["abc", "nan", "inf", "-inf", "[1,2]", "{a: 1}", "''", "1e400", "true"]
NEGATIVE = st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
NON_POSITIVE = st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
ABOVE_ONE = st.floats(min_value=1.0001, max_value=1e6, allow_nan=False)
OUTSIDE_UNIT = NEGATIVE | ABOVE_ONE

INVALID = {  # key -> values that must be refused (besides BAD_TOKENS)
    "trainer.epochs": st.integers(-10**6, 0),
    "trainer.accumulate": st.integers(-10**6, 0),
    "trainer.log_every": st.integers(-10**6, 0),
    "trainer.steps": st.integers(-10**6, 0),
    "trainer.threads": st.integers(-10**6, 0),
    "trainer.grad_clip": NON_POSITIVE,
    "trainer.save_every_s": NEGATIVE,
    "dataset.batch_size": st.integers(-10**6, 0),
    "dataset.eval_batch_size": st.integers(-10**6, 0),
    "dataset.num_workers": st.integers(-10**6, -1),
    "dataset.image_size": st.integers(-10**6, 0),
    "dataset.shots": st.integers(-10**6, 0),
    "dataset.val_fraction": NEGATIVE | st.floats(min_value=1.0, max_value=1e6),
    "dataset.test_fraction": NON_POSITIVE | st.floats(min_value=1.0, max_value=1e6),
    "dataset.fraction": NON_POSITIVE | ABOVE_ONE,
    "head.dropout": NEGATIVE | st.floats(min_value=1.0, max_value=1e6),
    "optimizer.lr": NON_POSITIVE,
    "optimizer.eps": NON_POSITIVE,
    "optimizer.weight_decay": NEGATIVE,
    "method.label_smoothing": NEGATIVE | st.floats(min_value=1.0, max_value=1e6),
    "method.layer_decay": NON_POSITIVE | ABOVE_ONE,
    "method.backbone_lr_mult": NEGATIVE,
    "scheduler.warmup_epochs": NEGATIVE,
    "scheduler.min_lr_ratio": OUTSIDE_UNIT,
}
CHOICES = ["trainer.precision", "trainer.device", "trainer.progress", "dataset.augment", "method.bn"]
GROUPS = ["trainer", "dataset", "head", "backbone", "optimizer", "method", "scheduler"]
NAMES = st.text(string.ascii_lowercase + "_", min_size=3, max_size=12).filter(
    lambda s: s not in {"epochs", "name", "root", "weights", "lr", "freeze", "seed", "hidden", "dropout", "steps"})


def _value(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


malformed = st.one_of(
    st.sampled_from(sorted(INVALID)).flatmap(
        lambda key: (INVALID[key].map(_value) | st.sampled_from(BAD_TOKENS)).map(lambda v: f"{key}={v}")),
    st.tuples(st.sampled_from(CHOICES), NAMES).map(lambda kv: f"{kv[0]}={kv[1]}x"),
    st.tuples(st.sampled_from(["+", ""]), st.sampled_from(GROUPS), NAMES).map(
        lambda t: f"{t[0]}{t[1]}.{t[2]}zz=1"),
    NAMES.map(lambda n: f"+{n}zz=1"),
)


@pytest.fixture(scope="module")
def with_override():
    """The default config composed once; each example goes through the two steps of Hydra's composition that
    read it: the override parser and the function that applies value overrides to the composed (struct) config.
    Every generated override is a value override (none picks a group option), so this is what `compose` would
    return, at a hundredth of its cost."""
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        base = compose("config")
    GlobalHydra.instance().clear()
    parser = OverridesParser.create()

    def apply(override: str):
        cfg = copy.deepcopy(base)
        ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides([override]), cfg)
        return cfg
    return apply


def test_the_shortcut_composes_what_hydra_composes(with_override):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for override in ["trainer.epochs=7", "+trainer.extra_key=1", "optimizer.lr=1e-4", "dataset.augment=none"]:
            assert with_override(override) == compose("config", overrides=[override])
    GlobalHydra.instance().clear()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(override=malformed)
def test_malformed_overrides_are_refused_before_any_work(with_override, override):
    try:
        validate(with_override(override))
    except UserError as err:
        message = str(err)
    except (HydraException, OmegaConfBaseException) as err:  # the CLI turns these into one paragraph
        message = " ".join(str(err).split()[:40])
    else:
        pytest.fail(f"{override} was accepted")
    assert message and "Traceback" not in message


@pytest.mark.parametrize("override", ["trainer.epochs=-3", "optimizer.lr=nan", "+trainer.epocsz=1",
                                      "dataset.augment=mixupx", "scheduler.min_lr_ratio=1e400"])
def test_the_entry_point_exits_2_without_traceback_or_folder(transfer, tmp_path, override):
    code, _, err = transfer("train", override, "trainer.progress=none")
    assert code == 2 and err.startswith("error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert run_folders(tmp_path) == []
