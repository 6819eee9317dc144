"""Structured-config schemas (types and defaults) registered in Hydra's ConfigStore.

The fixed parts of a run (dataset, backbone, head, trainer, source, target, eval) are dataclasses, so a
wrong type or a misspelt key fails while Hydra composes the config. The open parts (method, optimizer,
scheduler, ensemble) vary per registry entry; their keys are checked against the registered builder's
signature in ``validation.validate``.

Where defaults live (one place each): for the fixed parts, in the dataclasses below, and their group
YAML files set only what differs; for the open parts, in the entry's YAML file (conf/method/*.yaml ...),
and the builders take those keys as required keyword arguments.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

AUGMENTS = ("none", "flip_crop", "randaugment", "trivialaugment", "affine")
PROGRESS = ("auto", "rich", "plain", "none")
SPLITS = ("train", "val", "test")


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.1  # carved (seeded, stratified) from train when the dataset has no val split
    test_fraction: float = 0.2  # only for datasets that ship without any test split (digits)
    split_seed: int = 0  # carved splits stay the same across training seeds
    classes: list[int] | None = None  # keep these class indices (every split), relabelled 0..k-1 in this order
    shots: int | None = None  # keep this many labelled train examples per class (val/test untouched)
    fraction: float | None = None  # keep this stratified fraction of the train split
    # Which draw of shots / fraction: null = split_seed. The run's dataset defaults to ${seed} (conf/config.yaml),
    # so `seed=0,1,2 dataset.shots=16` trains on three different draws, as few-shot results are reported.
    shots_seed: int | None = None
    image_size: int | None = None  # None: the weights' crop size, else the data's own size
    augment: str = "none"
    mean: list[float] | None = None  # None: the weights' statistics, else computed on the train split
    std: list[float] | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: str = "auto"  # per-sample loading only: auto (cores - 1) | an integer >= 0
    in_memory: str = "auto"  # photos decoded once and held as uint8: auto (when under 4 GiB) | true | false
    cache_dir: str | None = "${output_dir}/cache/decoded"  # decoded copies, token ids and checked files; null: none kept
    # Text tables (dataset=csv_text): the columns (JSONL: keys) holding each row's text and label.
    text_column: str = "text"
    label_column: str = "label"
    group_by_length: bool = True  # text: training batches of similar lengths (less padding; order still random)
    drop_duplicates: bool = False  # remove val/test samples that equal a train sample (always counted in the notes)


@dataclass
class PreprocessConfig:
    """How the weights were trained to see images; each key set here wins over the weights' own values
    (a JSON sidecar next to a weights file, then the architecture's defaults)."""

    resize: int | None = None  # short side before the centre crop
    crop: int | None = None  # the square the model sees
    interpolation: str | None = None  # of the resize: bilinear | bicubic | nearest
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class TfidfConfig:
    """backbone=tfidf: scikit-learn's TfidfVectorizer settings, fitted on the train split only."""

    ngram_max: int = 2  # word n-grams from 1 to this
    min_df: int = 1  # keep n-grams found in at least this many train texts
    max_features: int | None = 20000  # the most frequent n-grams kept (features); null: all
    sublinear_tf: bool = False  # 1 + log(tf) instead of raw counts
    lowercase: bool = True


@dataclass
class BackboneConfig:
    name: str = "small_cnn"  # a registered backbone, any torchvision classifier, or timm/<model>[.<tag>]
    weights: str = "none"  # none | DEFAULT | a torchvision weights enum name | pretrained (timm) | a local file
    # Channels the model takes: null = the data's; 3 builds an RGB model for grayscale data (its images are
    # repeated to 3 channels), e.g. MNIST -> an RGB target. Architectures with a fixed stem refuse a change.
    in_channels: int | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Keep the body's first k stages (the stem is stage 1; the stages method.freeze counts); the features are
    # the last kept stage's output, average-pooled. null keeps the whole body. Images only.
    cut: int | None = None
    # Text backbones (minilm, hf, tfidf):
    path: str | None = None  # backbone=hf: a local model folder, or a Hugging Face hub name (needs a network)
    max_length: int = 128  # tokens kept per text; longer texts are truncated (batches pad to their longest)
    pool_layers: int = 1  # minilm / hf: the features are the mean pools of the last this-many layers, side by side
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)


@dataclass
class HeadConfig:
    hidden: list[int] = field(default_factory=list)  # widths of hidden layers; [] is a linear head
    dropout: float = 0.0  # before every linear layer of the head


@dataclass
class TrainerConfig:
    epochs: int = 15
    steps: int | None = None  # when set: train this many optimizer steps (epochs = steps / batches per epoch)
    device: str = "auto"  # auto | cpu | cuda | mps
    # Processes on this machine for one run: > 1 starts torchrun's elastic agent (DistributedDataParallel;
    # gloo on the CPU, one GPU per process with nccl). dataset.batch_size is per process.
    devices: int = 1
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None  # max gradient norm
    accumulate: int = 1  # optimizer step every N batches
    deterministic: bool = False
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    progress: str = "auto"  # auto: rich bars on a terminal, one line per epoch otherwise | rich | plain | none
    log_every: int = 20
    save_every_s: float = 60.0  # checkpoint cadence: after the first epoch, then at most this often, and at the end
    plots: bool = True
    resume: str = "none"  # none | auto (the newest unfinished run with this config) | PATH of a run folder
    overwrite: bool = False  # true: a fresh run may replace what a finished or started run left in its folder
    ema_decay: float | None = None  # evaluate and checkpoint an EMA of the weights (e.g. 0.999); null: off
    swa_start: int | None = None  # SWA: average the weights of every epoch from this one (1-based); null: off
    # Which epoch's weights are best.safetensors (and tested): val_acc1 (source validation accuracy) |
    # target_entropy | target_im | target_snd (label-free scores of the unlabelled target) | last
    select: str = "val_acc1"
    analyze: bool = False  # domain adaptation: features.png (t-SNE) + alignment.csv of the kept weights at the end


@dataclass
class SourceConfig:
    """The task a backbone is pretrained on when ``backbone.weights=source``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    epochs: int = 15
    optimizer: dict[str, Any] = MISSING  # an optimizer entry (conf/optimizer/*.yaml), chosen in the source YAML
    scheduler: dict[str, Any] = MISSING
    seed: int = 0
    cache_dir: str = "${output_dir}/cache/source"


@dataclass
class TargetConfig:
    """The target domain of unsupervised domain adaptation: its train split is used without labels,
    its test split (labelled) only for evaluation."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db, one store for every run
    experiment: str = "${dataset.name}"  # the MLflow experiment the run (or sweep) is logged under


@dataclass
class TensorboardConfig:
    dir: str = "tensorboard"  # the event folder, inside the run's folder (a sweep's jobs sit side by side)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled
    project: str = "transfer_cli"
    entity: str | None = None


@dataclass
class TrackerConfig:
    """Experiment trackers beside the CSV tables (which are always written and stay the source of truth):
    each one chosen (``tracker=[mlflow,tensorboard]``) fills its node; an unchosen one stays null."""

    log_model: bool = False  # also log checkpoints/best.safetensors and its sidecar
    csv: dict[str, Any] | None = None
    mlflow: MlflowConfig | None = None
    tensorboard: TensorboardConfig | None = None
    wandb: WandbConfig | None = None


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    output_dir: str = "outputs"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    source: SourceConfig | None = None
    target: TargetConfig | None = None
    method: dict[str, Any] = MISSING  # chosen in conf/config.yaml's defaults list
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


@dataclass
class EnsembleConfig:
    name: str = MISSING  # a fusion rule registered in evaluate.ENSEMBLES (conf/ensemble/*.yaml)
    weights: list[float] | None = None  # weighted: one weight per checkpoint


@dataclass
class FusionConfig:
    name: str = "none"  # none | wise | soup | greedy_soup (models/fusion.py's WEIGHT_FUSIONS)
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])  # wise only
    recompute_bn: bool = True  # measure BatchNorm statistics that differ between members again on train data


@dataclass
class EvalConfig:
    checkpoint: Any = "???"  # a path, or a list of paths to evaluate as an ensemble
    split: str = "test"
    output_dir: str = "outputs"
    dataset: DatasetConfig | None = None  # None: the dataset the checkpoint was trained on
    # dataset.KEY=VALUE given without dataset=NAME (the CLI moves them here): changes to the checkpoint's dataset
    dataset_changes: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "32"
    batch_size: int = 256
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class PredictConfig:
    checkpoint: Any = "???"  # a checkpoint, a list of them (an ensemble), a run/sweep folder, or an exported model
    input: str = "???"  # an image, a folder (recursive), a glob, or a .txt/.csv list of paths
    top_k: int = 3
    batch_size: int = 64
    output_dir: str = "outputs"
    device: str = "auto"
    precision: str = "32"
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class ExportConfig:
    checkpoint: str = "???"
    format: str = "onnx"  # onnx | torchscript
    quantize: str = "none"  # none | dynamic (int8 weights, activations quantized on the fly) | static (onnx: ranges calibrated)
    calibration: int = 256  # quantize=static: training images (the checkpoint's preprocessing) that set the ranges
    opset: int = 18  # ONNX only
    samples: int = 256  # real test images the export is verified on
    repeats: int = 20  # timed calls per latency figure (batch 1; a quarter of them at batch 32)
    output_dir: str = "outputs"
    dataset: DatasetConfig | None = None  # None: the dataset the checkpoint was trained on
    # dataset.KEY=VALUE given without dataset=NAME (the CLI moves them here): changes to the checkpoint's dataset
    dataset_changes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplainConfig:
    checkpoint: str = "???"
    input: str | None = None  # image files as transfer predict takes them; None: `samples` images of `split`
    split: str = "test"
    samples: int = 8
    # auto (gradcam for images, integrated_gradients per token for text) | gradcam | integrated_gradients |
    # occlusion; the CLI takes method=NAME for it
    attribution: str = "auto"
    compare: str | None = None  # a second checkpoint explained on the same images, side by side
    steps: int = 32  # integrated gradients: steps on the path from a black image
    window: int = 0  # occlusion: patch side in input pixels (0: a eighth of the side)
    seed: int = 0  # the samples drawn and the randomised-weights copy of the sanity check
    output_dir: str = "outputs"
    device: str = "auto"
    dataset: DatasetConfig | None = None  # None: the dataset the checkpoint was trained on
    dataset_changes: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnalyzeConfig:
    checkpoint: str = "???"
    dataset: DatasetConfig | None = None  # the source domain; None: the dataset the checkpoint was trained on
    # dataset.KEY=VALUE given without dataset=NAME (the CLI moves them here): changes to the checkpoint's dataset
    dataset_changes: dict[str, Any] = field(default_factory=dict)
    target: TargetConfig | None = None  # the other domain; None: the target of the checkpoint's training run
    split: str = "test"  # the labelled split of both domains whose features are compared
    samples: int = 1000  # per domain, drawn with ``seed``
    seed: int = 0
    output_dir: str = "outputs"
    device: str = "auto"
    precision: str = "32"


@dataclass
class RankConfig:
    # Each: what backbone= takes, as {name: ..., weights: ..., preprocess: ..., path: ...}, or a bare name
    candidates: list[Any] = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    scores: list[str] = field(default_factory=lambda: ["logme", "leep", "nce", "hscore", "sfda", "knn", "probe", "size"])
    # The score whose best candidate is recommended; auto: of the scores computed, the one that ordered the
    # benchmark pool best (rank.MEASURED_ORDER, from bench/results/rank_scores.md)
    recommend: str = "auto"
    bootstrap: int = 20  # resamples (within each class) for the confidence intervals; 0: none
    knn_k: int = 5
    # Measure the ranking: train the top K candidates by `recommend` (top_k:K) or all of them (all) with
    # validate_method, and report Kendall's tau_b, weighted tau and top-1 regret of every score against test top-1
    validate: str | None = None
    validate_method: str = "linear_probe"
    validate_overrides: list[str] = field(default_factory=list)  # more `transfer train` overrides, e.g. trainer.epochs=15
    source: SourceConfig | None = None  # source=NAME: the task candidates with weights=source are pretrained on
    seed: int = 0  # random-init candidates, the bootstrap and the probe's folds
    cache: bool = True
    cache_dir: str = "${output_dir}/cache/features"  # shared with linear_probe: a probed backbone ranks for free
    output_dir: str = "outputs"
    device: str = "auto"
    precision: str = "32"


def conf_dir() -> Path:
    """Configs ship inside the wheel; in a source checkout they sit at the repository top level."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _unique_suffix() -> str:
    return secrets.token_hex(3)


def register_schemas() -> None:
    """The schemas; ``${uid:}``: a random suffix for run folders, resolved once per config (cached like
    Hydra's ``${now:}``), so two runs started in the same second never share a folder; ``${slug:x}``."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="analyze_schema", node=AnalyzeConfig)
    cs.store(name="explain_schema", node=ExplainConfig)
    cs.store(name="rank_schema", node=RankConfig)
    OmegaConf.register_new_resolver("uid", _unique_suffix, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("slug", _slug, replace=True)


def _slug(value: str) -> str:
    """A name that is one path component: ``timm/resnet18`` -> ``timm-resnet18``."""
    return str(value).replace("/", "-")
