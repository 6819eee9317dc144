"""TensorBoard: one event folder per run (``<run>/tensorboard``): scalars per split with the epoch as step,
the hparams view (config -> final metrics), and the run's plots as images. A sweep's jobs sit side by side
under the sweep folder, so ``tensorboard --logdir SWEEP`` compares them.

Written with TensorBoard's own event writer and protocol buffers rather than ``torch.utils.tensorboard``,
whose import loads torch: the trackers' process starts before torch is imported and never needs it (about
a second of CPU less, on cores the training is using)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from transfer_cli.reporting.tracking.base import Tracker
from transfer_cli.reporting.tracking.record import RunRecord


class TensorboardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, dir: str) -> None:  # noqa: A002 - the config key
        self.subdir = dir
        self.writer: EventFileWriter | None = None
        self.params: dict[str, Any] = {}

    def start(self, record: RunRecord, resumed_after: int) -> None:
        folder = record.run_dir / self.subdir
        if not resumed_after:  # a fresh start (or a backfill) writes the folder anew: no steps twice
            shutil.rmtree(folder, ignore_errors=True)
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in record.params.items()}
        self.writer = EventFileWriter(str(folder), flush_secs=10)
        if resumed_after:  # what the stopped start logged after its last checkpoint is trained again:
            # TensorBoard drops the events at and after a session restart's step
            self._add(Event(step=resumed_after + 1, session_log=SessionLog(status=SessionLog.START)))

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        self._add(Event(step=step, summary=Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                                          for k, v in metrics.items()])))

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        metrics = {f"final/{k}": v for k, v in final.items()}
        for summary in _hparams({**self.params, "status": status}, list(metrics), status):
            self._add(Event(summary=summary))
        self.log_epoch(0, metrics)
        for path in files:
            if path.suffix == ".png":
                self._add(Event(summary=Summary(value=[Summary.Value(tag=f"plots/{path.stem}", image=_png(path))])))
        self.writer.close()

    def holds(self, record: RunRecord) -> bool:
        return False  # a backfill rewrites the run's event folder, which leaves no duplicates

    def _add(self, event: Event) -> None:
        event.wall_time = time.time()
        self.writer.add_event(event)


def _hparams(params: Mapping[str, Any], metric_tags: list[str], status: str) -> list[Summary]:
    """The hparams plugin's three records: the experiment (which params and metrics exist), this session's
    param values, and its end."""
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=_TYPES[type(v)]) for k, v in params.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags])
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in params.items():
        field = {bool: "bool_value", str: "string_value"}.get(type(value), "number_value")
        setattr(start.hparams[key], field, value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status == "FINISHED" else api_pb2.STATUS_FAILURE)
    records = {"experiment": plugin_data_pb2.HParamsPluginData(experiment=experiment),
               "session_start_info": plugin_data_pb2.HParamsPluginData(session_start_info=start),
               "session_end_info": plugin_data_pb2.HParamsPluginData(session_end_info=end)}
    return [Summary(value=[Summary.Value(tag=f"_hparams_/{name}", metadata=SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=data.SerializeToString())))])
        for name, data in records.items()]


_TYPES = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING, int: api_pb2.DATA_TYPE_FLOAT64,
          float: api_pb2.DATA_TYPE_FLOAT64}


def _png(path: Path) -> Summary.Image:
    """A PNG plot as it is on disk: TensorBoard shows the encoded bytes, nothing to decode."""
    with Image.open(path) as image:
        width, height = image.size
        channels = len(image.getbands())
    return Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=path.read_bytes())
