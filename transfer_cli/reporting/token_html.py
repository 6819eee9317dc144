"""Per-token attributions as an HTML page: each text's tokens shaded by their score (green for, red against
the predicted class; the strongest token of a text at full colour)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from transfer_cli.files import atomic_write_text


def write_token_html(path: Path, titles: Sequence[str], tokens: Sequence[Sequence[str]],
                     scores: Sequence[Sequence[float]], note: str) -> None:
    parts = ["<!doctype html><meta charset='utf-8'><title>transfer explain</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}span{padding:0 2px;"
             "border-radius:3px;line-height:1.9}h4{margin:1.4em 0 .3em}</style>", f"<p>{html.escape(note)}</p>"]
    for title, words, values in zip(titles, tokens, scores, strict=True):
        strongest = max((abs(v) for v in values), default=0.0) or 1.0
        spans = []
        for word, value in zip(words, values, strict=True):
            colour = "0,150,0" if value >= 0 else "200,0,0"
            spans.append(f"<span title='{value:+.4f}' style='background:rgba({colour},{abs(value) / strongest:.2f})'>"
                         f"{html.escape(word)}</span>")
        parts += [f"<h4>{html.escape(title)}</h4>", f"<p>{' '.join(spans)}</p>"]
    atomic_write_text(path, "\n".join(parts) + "\n")
