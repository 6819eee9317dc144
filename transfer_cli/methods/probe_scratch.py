"""The two reference points of any transfer comparison: a frozen backbone and no transfer at all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS, DataContext, LoaderFactory, Method
from transfer_cli.methods.feature_cache import cached_features, weights_digest
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Count, Fraction, NonNegative

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def head_lbfgs(model: Classifier, max_iter: int) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                             line_search_fn="strong_wolfe")


def lbfgs_head_step(lbfgs: torch.optim.LBFGS, model: Classifier, features: torch.Tensor, labels: torch.Tensor,
                    l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One L-BFGS call (up to its ``max_iter`` iterations) on the L2-regularised logistic loss of the head;
    returns the head's logits and that loss afterwards."""

    def objective() -> torch.Tensor:
        return F.cross_entropy(model.head(features), labels) + 0.5 * l2 * model.head_weight_sq_norm()

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads(1 if features.numel() <= ONE_THREAD_ELEMENTS else None):
        lbfgs.step(closure)
    with torch.no_grad():
        return model.head(features), objective()


# The sums of a matrix product round differently with the number of threads, and a weakly regularised
# L-BFGS fit amplifies that: the same probe gave 72.2 % with 1 thread and 73.9 % with 2 (l2=auto chose
# another strength), so a parallel sweep (a thread per job) disagreed with a sequential one. Fits up to
# this many feature values (a few-shot probe: seconds) run on one thread, whatever the process has.
ONE_THREAD_ELEMENTS = 2**25


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@METHODS.register("linear_probe")
class LinearProbe(Method):
    """Backbone frozen as a fixed feature extractor (BatchNorm included); only the head trains.

    Features are computed once per (weights, data, split, preprocessing) and cached under
    ``cache_dir``; every epoch, and every later run with the same key, trains on the cached tensors.
    ``solver=lbfgs`` fits the head as an L2-regularised logistic regression with full-batch L-BFGS
    (the linear-evaluation protocol of Kornblith et al. 2019); ``solver=sgd`` uses the configured
    optimizer on mini-batches of features. ``l2=auto`` picks the L2 strength on validation, as that
    protocol does, from a log grid.
    """

    trains_body = False

    def __init__(self, model: Classifier, *, solver: Literal["sgd", "lbfgs"], l2: NonNegative | Literal["auto"],
                 max_iter: Count, cache: bool, cache_dir: str, label_smoothing: Fraction) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        self.freeze_stages("all")
        self.freeze_norms()
        self.solver, self.l2, self.max_iter = solver, l2, max_iter
        self.l2_scores: dict[str, float] = {}  # l2=auto: validation top-1 of each candidate
        self.cache_dir = Path(cache_dir) if cache else None
        self.manual_optimization = solver == "lbfgs"
        self.on_features = False

    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        digest = weights_digest(self.model)
        out, cached = {}, {}
        for split in ("train", "val", "test"):
            plain = make(split, False)  # the linear-evaluation protocol uses no augmentation
            cached[split] = cached_features(self.model, plain, split, context.identity[split], self.cache_dir,
                                            context.device, context.precision, digest)
            train = split == "train"
            batch = len(cached[split][1]) if train and self.solver == "lbfgs" else plain.batch_size
            out[split] = DataLoader(TensorDataset(*cached[split]), batch_size=max(batch, 1), shuffle=train,
                                    generator=torch.Generator().manual_seed(0))
        if self.l2 == "auto" and self.solver == "lbfgs":  # solver=sgd regularises through optimizer.weight_decay
            self.l2 = self._choose_l2(cached["train"], cached["val"])
        self.on_features = True
        return out

    def _choose_l2(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]) -> float:
        """The L2 strength of L2_GRID whose probe is most accurate on validation (ties: the stronger one),
        each fitted from the same initial head; cheap, because the features are computed once."""
        if len(val[1]) == 0:
            raise UserError("method.l2=auto (the linear probe's default) chooses the L2 strength on the validation "
                            "split, and this run has none (dataset.val_fraction=0): give method.l2 a number (e.g. "
                            "0.01), or a validation split.")
        initial = {k: v.clone() for k, v in self.model.head.state_dict().items()}
        device = next(self.model.head.parameters()).device
        (x, y), (vx, vy) = [(f.to(device), t.to(device)) for f, t in (train, val)]
        for l2 in L2_GRID:
            self.model.head.load_state_dict(initial)
            lbfgs_head_step(head_lbfgs(self.model, 100), self.model, x, y, l2)
            with torch.no_grad():
                self.l2_scores[f"{l2:g}"] = 100 * float((self.model.head(vx).argmax(1) == vy).float().mean())
        self.model.head.load_state_dict(initial)
        best = max(self.l2_scores.values())
        return max(l2 for l2 in L2_GRID if self.l2_scores[f"{l2:g}"] == best)

    def describe(self) -> dict:
        chosen = {"l2": self.l2, "l2_val_acc1": self.l2_scores} if self.l2_scores else {}
        return {**super().describe(), **chosen}

    def training_step(self, batch):
        features, labels = batch
        if self.solver == "sgd":
            logits = self.model.head(features)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            return {"loss": loss, "logits": logits.detach(), "labels": labels}
        self._ensure_lbfgs()
        logits, loss = lbfgs_head_step(self.lbfgs, self.model, features, labels, self.l2)
        return {"loss": loss, "logits": logits, "labels": labels}

    def _ensure_lbfgs(self) -> None:
        if not hasattr(self, "lbfgs"):
            self.lbfgs = head_lbfgs(self.model, self.max_iter)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.on_features else self.model(x)

    def extra_state(self) -> dict:
        return {"lbfgs": self.lbfgs.state_dict()} if hasattr(self, "lbfgs") else {}

    def load_extra_state(self, saved: dict, state) -> None:
        if "lbfgs" in saved:
            self._ensure_lbfgs()
            self.lbfgs.load_state_dict(saved["lbfgs"])


@METHODS.register("scratch")
class Scratch(Method):
    """Every layer re-initialised and trained: what the task reaches with no pretrained knowledge."""

    uses_pretrained_weights = False

    def __init__(self, model: Classifier, *, label_smoothing: Fraction) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        for module in model.body.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
