"""Published target accuracies to print next to measured ones.

ADDA (Tzeng et al. 2017), Table 1: LeNet, 2000 MNIST / 1800 USPS training images, full target test set.
"""

from __future__ import annotations

import pandas as pd

ADDA_TABLE_1 = {
    "mnist->usps": {"source_only": 75.2, "dann": 77.1, "adda": 89.4},
    "usps->mnist": {"source_only": 57.1, "dann": 73.0, "adda": 90.1},
}


def add_published(grouped: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """A ``published_target_acc1`` column where the sweep is a direction and method of ADDA's Table 1."""
    if "method" not in grouped.columns or "target" not in runs.columns:
        return grouped
    directions = runs["target"].dropna().unique()
    if len(directions) != 1 or directions[0] not in ADDA_TABLE_1:
        return grouped
    published = ADDA_TABLE_1[directions[0]]
    return grouped.assign(published_target_acc1=[published.get(m) for m in grouped["method"]])
