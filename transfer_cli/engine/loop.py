"""One flat training loop. Everything optional (evaluation, logging, checkpoints, progress) is a hook."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transfer_cli.engine.device import Precision, to_device
from transfer_cli.engine.distributed import SINGLE, Dist
from transfer_cli.engine.metrics import Meter, logit_metrics


class Diverged(Exception):
    """Training produced a non-finite loss; the run stops there instead of training on NaN."""

    def __init__(self, epoch: int, batch: int, step: int, last_finite: float | None) -> None:
        last = f"{last_finite:.4g}" if last_finite is not None else "none (the first loss was already non-finite)"
        super().__init__(
            f"training diverged: the loss became non-finite at epoch {epoch + 1}, batch {batch + 1} "
            f"(optimizer step {step}); last finite loss {last}. Nothing after the last good epoch was saved as "
            "best. Lower optimizer.lr, set trainer.grad_clip, or check dataset.mean/std."
        )
        self.epoch, self.batch, self.step, self.last_finite = epoch, batch, step, last_finite

    def facts(self) -> dict[str, Any]:
        """Where it happened, 1-based, as a run summary records it (``diverged_at``)."""
        return {"epoch": self.epoch + 1, "batch": self.batch + 1, "step": self.step,
                "last_finite_loss": self.last_finite}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Diverged:
        """The error again, from a summary's ``diverged_at`` (a process that only reads the run folder)."""
        return cls(facts["epoch"] - 1, facts["batch"] - 1, facts["step"], facts["last_finite_loss"])


@dataclass
class State:
    """What hooks can see and change while fitting. ``method`` is the transfer method (an nn.Module
    with ``training_step``, ``manual_optimization`` and ``model``); the loop needs nothing else of it."""

    method: nn.Module
    optimizer: torch.optim.Optimizer | None  # None when the method optimises itself
    scheduler: Any
    max_epochs: int
    steps_per_epoch: int  # batches per epoch
    epoch: int = 0  # 0-based index of the current epoch
    step: int = 0  # optimizer steps taken so far
    batch: int = 0  # index of the current batch within the epoch
    meter: Meter = field(default_factory=Meter)
    epoch_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> metrics, this epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per (epoch, split)
    best: dict[str, Any] = field(default_factory=dict)
    last_loss: float | None = None  # the last finite training loss, named if training diverges


class LossWatch:
    """Finds the first non-finite training loss without a host sync per step on an accelerator: the first
    bad step and the last finite loss are tracked on the device and read every ``every`` steps (every step
    on the CPU, where reading costs nothing). Weights may go non-finite in between; they are never saved,
    and the best weights kept so far come from finished epochs."""

    def __init__(self, device: torch.device) -> None:
        self.every = 1 if device.type == "cpu" else 32
        self.bad = torch.full((3,), -1, dtype=torch.long, device=device)  # batch, step, flag of the first bad loss
        self.last = torch.full((), float("nan"), device=device)

    def update(self, loss: torch.Tensor, batch: int, step: int) -> None:
        loss = loss.detach().float()
        fresh = (self.bad[2] < 0) & ~torch.isfinite(loss)
        self.bad = torch.where(fresh, torch.tensor([batch, step, 1], device=loss.device), self.bad)
        self.last = torch.where((self.bad[2] < 0) & torch.isfinite(loss), loss, self.last)

    def check(self, state: State, dist: Dist = SINGLE) -> None:
        """Raise Diverged on every process when the loss went non-finite on any of them."""
        if dist.active:
            anywhere = dist.sum_((self.bad[2:] > 0).float().cpu())
            if anywhere.item() > 0 and self.bad[2] < 0:
                raise Diverged(state.epoch, state.batch, state.step, state.last_loss)
        batch, step, flag = self.bad.tolist()
        last = self.last.item()
        if flag > 0:
            raise Diverged(state.epoch, batch, step, last if math.isfinite(last) else state.last_loss)
        if math.isfinite(last):
            state.last_loss = last


class _Step(nn.Module):
    """The method's training step as a module's forward, so DistributedDataParallel sees every parameter
    the step uses (the backbone, the head, a domain discriminator, LoRA adapters ...)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.method.training_step(batch)


class Synced:
    """The training step under DistributedDataParallel (gradients averaged over the processes), wrapped
    again whenever the set of trainable parameters changes (gradual unfreezing, SHOT's phases): DDP only
    synchronises the parameters that required gradients when it was built. One process: the plain step."""

    def __init__(self, method: nn.Module, device: torch.device, dist: Dist) -> None:
        self.method, self.device, self.dist = method, device, dist
        self.trainable: tuple[str, ...] | None = None
        self.ddp: nn.Module | None = None

    def start_epoch(self) -> None:
        """Wrap again if the trainable set changed; hooks change it between epochs, never within one."""
        if not self.dist.active or getattr(self.method, "manual_optimization", False):
            return
        trainable = tuple(n for n, p in self.method.named_parameters() if p.requires_grad)
        if trainable != self.trainable:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                _Step(self.method), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(self.method, "unused_parameters", False))
            self.trainable = trainable

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.ddp(batch) if self.ddp is not None else self.method.training_step(batch)


class Hook:
    """Runs at the loop's events. A hook with state of its own (an average, the best weights so far) returns
    it from ``state_dict`` and takes it back in ``load_state_dict``, so a resumed run continues it; the
    resumable training state is the loop's state plus every hook's."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...

    def before_fit(self, state: State) -> None: ...
    def before_epoch(self, state: State) -> None: ...
    def after_step(self, state: State) -> None: ...
    def after_epoch(self, state: State) -> None: ...
    def after_fit(self, state: State) -> None: ...


def fit(
    state: State,
    loader: Iterable,
    device: torch.device,
    precision: Precision,
    hooks: Sequence[Hook] = (),
    accumulate: int = 1,
    grad_clip: float | None = None,
) -> State:
    method, optimizer, scaler = state.method, state.optimizer, precision.scaler
    dist = getattr(loader, "dist", SINGLE)  # sharded loaders carry the process group they shard for
    step = Synced(method, device, dist)
    for hook in hooks:
        hook.before_fit(state)
    for epoch in range(state.epoch, state.max_epochs):
        state.epoch, state.meter, state.epoch_metrics = epoch, Meter(), {}
        method.train()
        for hook in hooks:
            hook.before_epoch(state)
        step.start_epoch()
        lr = optimizer.param_groups[0]["lr"] if optimizer else float("nan")
        watch = LossWatch(device)
        start = time.perf_counter()
        for index, batch in enumerate(loader):
            state.batch = index
            batch = to_device(batch, device)
            with precision.autocast():
                out = step(batch)
            watch.update(out["loss"], index, state.step)
            if index + 1 == state.steps_per_epoch or (index + 1) % watch.every == 0:
                watch.check(state, dist)
            if method.manual_optimization:
                state.step += 1
            else:
                scaler.scale(out["loss"] / accumulate).backward()
                if (index + 1) % accumulate == 0 or index + 1 == state.steps_per_epoch:
                    if grad_clip:
                        scaler.unscale_(optimizer)
                        params = [p for group in optimizer.param_groups for p in group["params"]]
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    state.scheduler.step()
                    state.step += 1
            state.meter.update(out)
            for hook in hooks:
                hook.after_step(state)
        seconds = time.perf_counter() - start
        state.meter.reduce(dist)
        dist.copy_buffers(method)
        train = state.meter.compute()
        state.epoch_metrics["train"] = {**train, "lr": lr, "seconds": seconds,
                                        "samples_per_s": state.meter.count / seconds}
        for hook in hooks:
            hook.after_epoch(state)
    for hook in hooks:
        hook.after_fit(state)
    return state


def infer(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
          precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` applied to every batch of ``loader`` (float32 outputs on the CPU) and the batches' labels.
    Inference mode skips autograd's bookkeeping; the results are concatenated outside it, so they are
    ordinary tensors that training may use (cached features feed a head that learns)."""
    outputs, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            with precision.autocast():
                outputs.append(fn(to_device(x, device)).float().cpu())
            labels.append(y.cpu())
    dist = getattr(loader, "dist", SINGLE)
    if not dist.active:
        return torch.cat(outputs), torch.cat(labels)
    # Each process saw every world-th sample: put the parts back in the loader's order, on every process.
    parts = dist.gather((torch.cat(outputs), torch.cat(labels)))
    count = sum(len(y) for _, y in parts)
    merged = [torch.empty(count, *parts[0][0].shape[1:]), torch.empty(count, dtype=parts[0][1].dtype)]
    for rank, (out, y) in enumerate(parts):
        merged[0][rank::dist.world], merged[1][rank::dist.world] = out, y
    return merged[0], merged[1]


def evaluate(method: nn.Module, loader: Iterable, device: torch.device, precision: Precision) -> dict[str, float]:
    """Loss and accuracy of ``method.predict`` on every sample of ``loader``."""
    start = time.perf_counter()
    method.eval()
    logits, labels = infer(method.predict, loader, device, precision)
    seconds = time.perf_counter() - start
    return {**logit_metrics(logits, labels), "seconds": seconds, "samples_per_s": len(labels) / seconds}
