"""Classification metrics shared by training, validation and `transfer eval`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfer_cli.engine.distributed import Dist


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def accuracy_columns(num_classes: int) -> tuple[int, ...]:
    return (1, 5) if num_classes >= 5 else (1,)


class Meter:
    """Running sums kept on the device, so training never waits for the GPU until someone reads them.
    A step may come without labels (``labels`` None: e.g. source-free adaptation on target batches); the
    accuracies average over the labelled samples only."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.labelled = 0

    def update(self, out: dict[str, torch.Tensor]) -> None:
        labels, logits = out["labels"], out["logits"]
        n = logits.shape[0]
        for key, value in out.items():  # every scalar a method reports: loss terms, domain accuracy ...
            if key not in ("logits", "labels") and value.ndim == 0:
                self._add(key, value.detach().float() * n)
        if labels is not None:
            for k in accuracy_columns(logits.shape[1]):
                self._add(f"acc{k}", topk_correct(logits, labels, k))
            self.labelled += n
        self.count += n

    def reduce(self, dist: Dist) -> None:
        """Sum every process's running sums and counts (exact over the whole epoch; a no-op in one process)."""
        if not dist.active:
            return
        keys = sorted(self.sums)
        packed = torch.stack([*(self.sums[k].double().cpu() for k in keys),
                              torch.tensor(float(self.count), dtype=torch.float64),
                              torch.tensor(float(self.labelled), dtype=torch.float64)])
        dist.sum_(packed)
        self.sums = dict(zip(keys, packed[:len(keys)], strict=True))
        self.count, self.labelled = int(packed[-2]), int(packed[-1])

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {}
        out = {}
        for key, total in self.sums.items():
            accuracy = key.startswith("acc")
            out[key] = (100.0 / self.labelled if accuracy else 1.0 / self.count) * total.item()
        return out


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = {"loss": F.cross_entropy(logits.float(), labels).item()}
    for k in accuracy_columns(logits.shape[1]):
        metrics[f"acc{k}"] = 100.0 * topk_correct(logits, labels, k).item() / len(labels)
    return metrics
