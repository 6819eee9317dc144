"""Sweep tables: one row per job, a mean ± std table over seeds, a plot, and a Hydra callback.

Everything is rebuilt from what the jobs left on disk (`.hydra/overrides.yaml`, `summary.json`,
`error.json`), so the same code serves a finished sweep, an interrupted one and `transfer report`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text
from transfer_cli.reporting.published import add_published
from transfer_cli.reporting.summary import summary_row
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.reporting.tracking import Trackers
from transfer_cli.reporting.tracking.background import open_trackers
from transfer_cli.run_folder import RunFolder, RunSummary

GROUP_METRICS = ["val_acc1", "test_acc1", "target_test_acc1", "test_loss", "best_epoch", "seconds"]
SWEEP_CONFIG = "multirun.yaml"  # Hydra writes it at the top of every sweep folder


def is_sweep_folder(path: Path) -> bool:
    return (path / SWEEP_CONFIG).is_file()


def sweep_folders(root: Path) -> list[Path]:
    """The sweep folders directly under ``root``, newest name first."""
    return sorted((p.parent for p in root.glob(f"*/{SWEEP_CONFIG}")), reverse=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    found = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    return sorted(found, key=lambda p: (len(p.parts), int(p.name) if p.name.isdigit() else p.name))


def _overrides(job: Path) -> dict[str, str]:
    pairs = OmegaConf.load(job / ".hydra" / "overrides.yaml")
    out = {}
    for item in pairs:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The task overrides a sweep was started with (hydra.* ones left out), as given on the command line."""
    stored = OmegaConf.load(sweep_dir / SWEEP_CONFIG)
    task = OmegaConf.select(stored, "hydra.overrides.task", default=[]) or []
    return [str(o) for o in task if not str(o).startswith("hydra.")]


def planned_jobs(sweep_dir: Path) -> list[dict[str, str]] | None:
    """Every job the sweep was asked to run (from its multirun.yaml), as override key -> value; None when
    the sweeper does not enumerate its jobs up front (e.g. Optuna) or the file is missing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / SWEEP_CONFIG
    if not path.is_file():
        return None
    stored = OmegaConf.load(path)
    if "optuna" in str(OmegaConf.select(stored, "hydra.sweeper._target_", default="")).lower():
        return None
    params = OmegaConf.select(stored, "hydra.sweeper.params", default=None) or {}
    given = [*sweep_overrides(sweep_dir), *(f"{k}={v}" for k, v in params.items())]  # + presets (sweep=...)
    parsed = OverridesParser.create().parse_overrides(given)
    axes = [[(o.get_key_element().lstrip("+~"), v) for v in (o.sweep_string_iterator() if o.is_sweep_override()
             else [o.get_value_element_as_str()])] for o in parsed if not o.get_key_element().startswith("hydra.")]
    return [dict(combo) for combo in itertools.product(*axes)]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or remove it, then run the report again.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; fix or remove it, then run the report again.")
    return data


def read_job(job: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": job.name, **_overrides(job)}
    summary, error = RunFolder(job).summary, RunFolder(job).error
    if summary.is_file():
        facts = summary_row(RunSummary.from_json(read_json(summary)))
        row.update({k: v for k, v in facts.items() if k not in row and k not in ("dataset", "backbone", "method")})
    elif error.is_file():
        row.update(status="failed", error=read_json(error).get("error"))
    else:
        row.update(status="incomplete")  # still running, or killed before it finished
    return row


def swept_keys(rows: list[dict[str, Any]], overrides: list[str]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    return [k for k in overrides if len({str(r.get(k)) for r in rows}) > 1]


def sweep_frame(sweep_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    jobs = job_dirs(sweep_dir)
    rows = [read_job(j) for j in jobs]
    order = list(dict.fromkeys(k for j in jobs for k in _overrides(j)))
    for planned in planned_jobs(sweep_dir) or []:  # jobs the sweep never started (killed, or still queued)
        if not any(all(str(r.get(k)) == v for k, v in planned.items()) for r in rows):
            rows.append({"job": "-", **planned, "status": "not run"})
            order += [k for k in planned if k not in order]
    keys = swept_keys(rows, order)
    df = pd.DataFrame(rows)
    for column in ("best_epoch", "epochs", "trainable", "params"):
        if column in df.columns:  # failed jobs leave gaps; keep the counts integers
            df[column] = df[column].astype("Int64")
    fixed = ["job", *keys, "status"]
    metrics = [c for c in ("val_acc1", "best_epoch", "final_val_acc1", "test_acc1", "test_loss", "target",
                           "target_test_acc1", "epochs",
                           "trainable", "params", "seconds", "error") if c in df.columns]
    picks = [c for c in df.columns if c.startswith("pick_")]
    return df[fixed + metrics + picks], keys


def group_over_seed(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, std and n over seeds for every combination of the other swept keys (a key that some rows
    lack, e.g. sweeps that varied different keys, is blank there rather than dropping the row)."""
    ok = df[df["status"] == "ok"]
    by = [k for k in keys if k != "seed"]
    metrics = [m for m in GROUP_METRICS if m in ok.columns]
    if ok.empty or not metrics:
        return pd.DataFrame()
    ok = ok.assign(**{k: ok[k].astype(object).where(ok[k].notna(), "") for k in by if k in ok.columns})
    grouped = ok.groupby(by, sort=False, dropna=False) if by else ok.assign(_all="all").groupby("_all")
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    table["n"] = grouped.size()
    return table.reset_index().drop(columns=["_all"], errors="ignore")


def add_gain_over_source_only(grouped: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A ``target_gain_vs_source_only`` column (mean target top-1 minus source_only's, with the other swept
    keys equal) when the sweep ran source_only next to adaptation methods: a negative value is negative
    transfer, which no single run can see."""
    if "method" not in grouped.columns or "target_test_acc1_mean" not in grouped.columns:
        return grouped
    others = [k for k in keys if k not in ("seed", "method") and k in grouped.columns]
    base = grouped.loc[grouped["method"] == "source_only", [*others, "target_test_acc1_mean"]]
    if base.empty:
        return grouped
    base = base.rename(columns={"target_test_acc1_mean": "_base"})
    merged = grouped.merge(base, on=others, how="left") if others else grouped.assign(_base=base["_base"].iloc[0])
    return grouped.assign(target_gain_vs_source_only=(merged["target_test_acc1_mean"] - merged["_base"]).to_numpy())


def pretty_grouped(grouped: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`mean ± std` text cells: the table a paper prints."""
    out = grouped[[k for k in keys if k in grouped.columns]].copy()
    for metric in GROUP_METRICS:
        if f"{metric}_mean" in grouped.columns:
            mean, std = grouped[f"{metric}_mean"], grouped[f"{metric}_std"].fillna(0.0)
            digits = 1 if metric == "best_epoch" else 2
            out[metric] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean, std, strict=True)]
    if "target_gain_vs_source_only" in grouped.columns:
        out["target_gain_vs_source_only"] = [f"{v:+.2f}" if pd.notna(v) else "" for v in grouped["target_gain_vs_source_only"]]
    if "published_target_acc1" in grouped.columns:  # blank where the paper has no such method
        out["published_target_acc1"] = [f"{v:.1f}" if pd.notna(v) else "" for v in grouped["published_target_acc1"]]
    out["n"] = grouped["n"]
    return out


def write_sweep_report(sweep_dir: Path, console: Console | None = None) -> pd.DataFrame:
    from transfer_cli.reporting.plots import plot_sweep

    console = console or Console()
    df, keys = sweep_frame(sweep_dir)
    write_table(df, sweep_dir / "sweep.csv")
    grouped = add_gain_over_source_only(add_published(group_over_seed(df, keys), df), keys)
    if not grouped.empty:
        write_table(grouped, sweep_dir / "summary.csv", markdown=False)
        pretty = pretty_grouped(grouped, keys)
        atomic_write_text(sweep_dir / "summary.md", pretty.to_markdown(index=False) + "\n")
        if "target_gain_vs_source_only" in grouped:
            for row in grouped[grouped["target_gain_vs_source_only"] < 0].itertuples():
                console.print(f"[red]negative transfer:[/] method={row.method} reaches {row.target_test_acc1_mean:.2f} "
                              f"on the target, {-row.target_gain_vs_source_only:.2f} points below source_only.")
        val = grouped.get("val_acc1_mean")
        picked = val is not None and bool(val.notna().any())  # dataset.val_fraction=0 leaves no validation score
        best = [int(val.idxmax())] if picked else []
        note = "best on validation in green" if picked else "no validation split: no run picked"
        shown = pretty.drop(columns=["test_loss"], errors="ignore")  # the files keep every column
        console.print(rich_table(shown, title=f"sweep {sweep_dir} ({note})", highlight=best))
        x_keys = [k for k in keys if k != "seed"]
        if x_keys:
            plot_sweep(grouped, x_keys, sweep_dir / "sweep.png")
    validators = validator_table(df, keys)
    if not validators.empty:
        write_table(validators, sweep_dir / "validators.csv", markdown=True)
        console.print(rich_table(validators, title="target test top-1 of the checkpoint each validator picks "
                                                   "(oracle: picked with target labels, for reference only)"))
    return df


def validator_table(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per combination of the swept keys (seeds pooled): mean ± std target test accuracy of the epoch each
    label-free validator picks, the last epoch's, and the oracle's (best target test: uses target labels)."""
    ok = df[df["status"] == "ok"]
    picks = [c for c in ok.columns if c.startswith("pick_") and ok[c].notna().any()]
    if ok.empty or not picks:
        return pd.DataFrame()
    by = [k for k in keys if k != "seed"]
    grouped = ok.groupby(by, sort=False, dropna=False) if by else ok.assign(_all="all").groupby("_all")
    mean, std = grouped[picks].mean(), grouped[picks].std().fillna(0.0)
    table = pd.DataFrame(index=mean.index)
    for column in picks:
        name = column.removeprefix("pick_")
        table[name if name != "oracle" else "oracle (target labels)"] = [
            f"{m:.2f} ± {s:.2f}" for m, s in zip(mean[column], std[column], strict=True)]
    table["n"] = grouped.size()
    return table.reset_index().drop(columns=["_all"], errors="ignore")


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write the sweep tables and plot into the sweep dir, and, when
    ``status_file`` is set (the CLI sets it), the sweep folder and the jobs that did not end ``ok`` as JSON
    there: Hydra ignores a callback's exceptions, so this is how the command learns to exit non-zero. With
    trackers chosen, the sweep is a parent run they open before the first job and close after the last."""

    def __init__(self, status_file: str | None = None) -> None:
        self.status_file = status_file

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        overrides = [str(o) for o in config.hydra.overrides.task if not str(o).startswith("hydra.")]
        trackers = _sweep_trackers(config)
        trackers.start_sweep(sweep_dir, sweep_dir.name, {"overrides": " ".join(overrides)})
        trackers.close()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = write_sweep_report(sweep_dir)
        except Exception as err:  # Hydra would only warn: the CLI must still exit non-zero
            if self.status_file:
                status = {"sweep_dir": str(sweep_dir), "report_error": f"{type(err).__name__}: {err}"}
                atomic_write_text(Path(self.status_file), json.dumps(status))
            _close_sweep(config, sweep_dir, "FAILED", [])
            raise
        failed = df[df["status"] != "ok"].astype(object).where(df.notna(), None)
        _close_sweep(config, sweep_dir, "FAILED" if len(failed) else "FINISHED", sweep_files(sweep_dir))
        if self.status_file:
            status = {"sweep_dir": str(sweep_dir), "jobs": len(df), "failed": failed.to_dict("records")}
            atomic_write_text(Path(self.status_file), json.dumps(status, default=str))


def sweep_files(sweep_dir: Path) -> list[Path]:
    """The sweep's own tables and plot, as written by ``write_sweep_report``."""
    names = ("sweep.csv", "summary.csv", "summary.md", "sweep.png", "validators.csv")
    return [sweep_dir / n for n in names if (sweep_dir / n).is_file()]


def _sweep_trackers(config: DictConfig) -> Trackers:
    """Opened where used, never kept on the callback: launchers pickle it to their workers."""
    settings = OmegaConf.to_container(config.tracker, resolve=True) if "tracker" in config else {}
    return open_trackers(settings or {}, str(config.get("output_dir", "outputs")))


def _close_sweep(config: DictConfig, sweep_dir: Path, status: str, files: list[Path]) -> None:
    trackers = _sweep_trackers(config)
    trackers.finish_sweep(sweep_dir.resolve(), status, files)
    trackers.close()
