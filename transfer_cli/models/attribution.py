"""Which pixels a prediction rests on: Grad-CAM, integrated gradients and occlusion through Captum, as
maps over the model's input square, plus the two checks that tell a faithful map from a pretty one: the
randomised-weights sanity check (Adebayo et al. 2018) and the deletion curve. For text models: integrated
gradients of each token's embedding."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import stats
from torch import nn

from transfer_cli.data.tokens import PAD
from transfer_cli.errors import UserError
from transfer_cli.models.backbone import Classifier

METHODS = ("gradcam", "integrated_gradients", "occlusion")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as the [0, 1] floats the input adapter also takes (gradients need a float input)."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def last_feature_map(model: Classifier, example: torch.Tensor) -> tuple[nn.Module, int | None]:
    """Grad-CAM's layer, with None: the body module that last outputs a spatial map [N, C, H, W] of at least
    2 x 2 in a forward pass (a 1 x 1 map, e.g. after the last pooling of a small CNN on 8 px digits, locates
    nothing). A vision transformer's last block instead, with the number of special tokens (the class token)
    before the patches: Grad-CAM weighs the patch tokens entering it, the last ones the prediction still
    reads through attention (after it, only the class token is read)."""
    block = _last_transformer_block(model.body)
    if block is not None:
        seen: list[int] = []
        hook = block.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
        try:
            with torch.no_grad():
                model(example[:1])
        finally:
            hook.remove()
        side = int(seen[0] ** 0.5)
        return block, seen[0] - side * side
    found: list[tuple[nn.Module, int]] = []

    def record(module: nn.Module, _: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            found.append((module, min(out.shape[-2:])))

    hooks = [m.register_forward_hook(record) for m in model.body.modules() if m is not model.body]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise UserError(f"method=gradcam needs a convolutional feature map or transformer blocks over patches, but "
                        f"backbone={model.backbone_name} has neither. Allowed here: method=integrated_gradients or "
                        "occlusion.")
    spatial = [module for module, side in found if side >= 2]
    return (spatial[-1] if spatial else found[-1][0]), None


def _last_transformer_block(body: nn.Module) -> nn.Module | None:
    """The last block of a vision transformer (timm: ``blocks``; torchvision: ``encoder.layers``), or None."""
    for path in ("blocks", "encoder.layers"):
        blocks = body
        for name in path.split("."):
            blocks = getattr(blocks, name, None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
            return blocks[-1]
    return None


def _token_gradcam(model: Classifier, inputs: torch.Tensor, target: torch.Tensor, block: nn.Module,
                   prefix: int) -> torch.Tensor:
    """Grad-CAM over the patch tokens entering ``block``: each token's activations weighted by the mean gradient
    of the target logit per channel, positive part, laid out on the patch grid [N, 1, g, g]."""
    seen: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        seen["tokens"] = args[0]

    hook = block.register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            model(inputs).gather(1, target[:, None]).sum().backward()
    finally:
        hook.remove()
    patches, grads = seen["tokens"][:, prefix:], seen["tokens"].grad[:, prefix:]
    cam = (grads.mean(1, keepdim=True) * patches).sum(-1).clamp(min=0)
    side = int(cam.shape[1] ** 0.5)
    return cam.view(len(cam), 1, side, side).detach()


def attribute(model: Classifier, x: torch.Tensor, target: torch.Tensor, method: str, steps: int = 32,
              window: int = 0) -> torch.Tensor:
    """Attribution maps [N, S, S] (S: the input side) of ``model``'s ``target`` logits for images ``x``:
    non-negative, larger = more responsible for the prediction."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    model.eval()
    inputs = _as_float(x).requires_grad_(method != "occlusion")
    side = x.shape[-1]
    if method == "gradcam":
        layer, prefix = last_feature_map(model, inputs.detach())
        cam = (LayerGradCam(model, layer).attribute(inputs, target=target) if prefix is None
               else _token_gradcam(model, inputs, target, layer, prefix))
        maps = LayerAttribution.interpolate(cam, (side, side), interpolate_mode="bilinear").clamp(min=0)[:, 0]
    elif method == "integrated_gradients":
        attributions = IntegratedGradients(model).attribute(inputs, target=target, n_steps=steps,
                                                            baselines=torch.zeros_like(inputs))
        maps = attributions.sum(1).abs()
    else:
        size = window or max(2, side // 8)
        channels = x.shape[1]
        attributions = Occlusion(model).attribute(inputs, target=target, sliding_window_shapes=(channels, size, size),
                                                  strides=(channels, max(1, size // 2), max(1, size // 2)), baselines=0)
        maps = attributions.sum(1).clamp(min=0)
    return maps.detach()


def randomised_copy(model: Classifier, seed: int) -> Classifier:
    """The same architecture with freshly initialised weights (seeded): an explanation that still looks the
    same for it did not come from what the model learned."""
    torch.manual_seed(seed)
    copy = Classifier.from_recipe(model.recipe).to(next(model.parameters()).device)
    copy.input.load_state_dict(model.input.state_dict())  # the same preprocessing; only learned weights change
    return copy.eval()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Spearman correlation of each pair of maps (pixels as observations). A constant map (a randomised copy's
    Grad-CAM or occlusion map is often all zero) orders no pixel: 0 against a map that does, NaN against
    another constant one."""
    out = []
    for p, q in zip(a, b, strict=True):
        p, q = p.flatten().cpu().numpy(), q.flatten().cpu().numpy()
        flat = (np.ptp(p) == 0) + (np.ptp(q) == 0)
        out.append(float(stats.spearmanr(p, q).statistic) if flat == 0 else 0.0 if flat == 1 else float("nan"))
    return out


def top_share(maps: torch.Tensor, fraction: float = 0.1) -> list[float]:
    """The share of each map's total attribution held by its top ``fraction`` of pixels (1: all in them)."""
    flat = maps.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    total = flat.sum(1).clamp(min=1e-12)
    return (flat.topk(k, dim=1).values.sum(1) / total).tolist()


def after_deletion(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ranking: torch.Tensor,
                   fraction: float) -> torch.Tensor:
    """Probabilities [N, classes] once the first ``fraction`` of each image's pixels in ``ranking`` (pixel
    indices, one row per image) are set to 0."""
    pixels = ranking.shape[1]
    keep = torch.ones(len(x), pixels, device=x.device)
    keep.scatter_(1, ranking[:, :round(fraction * pixels)], 0.0)
    removed = (x.float() * keep.view(len(x), 1, *x.shape[-2:])).round().to(x.dtype)
    with torch.no_grad():
        return predict(removed).softmax(1)


def most_attributed_first(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).argsort(dim=1, descending=True)


def deletion_curve(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, maps: torch.Tensor,
                   reference: torch.Tensor, fractions: list[float], seed: int) -> list[dict[str, float]]:
    """Per fraction f: how often the prediction still equals ``reference`` (and its mean probability) after the
    top-f most attributed pixels are set to 0, next to the same count of randomly chosen pixels. A faithful
    map loses the prediction faster than the random order."""
    pixels = maps.flatten(1).shape[1]
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(len(x))]).to(x.device)
    orders = (("attributed", most_attributed_first(maps)), ("random", random_order))
    rows = []
    for fraction in fractions:
        row: dict[str, float] = {"fraction_removed": fraction}
        for name, ranking in orders:
            probs = after_deletion(predict, x, ranking, fraction)
            row[f"kept_prediction_{name}"] = 100 * float((probs.argmax(1) == reference).float().mean())
            row[f"probability_{name}"] = float(probs.gather(1, reference[:, None]).mean())
        rows.append(row)
    return rows


def token_attributions(model: Classifier, ids: torch.Tensor, target: torch.Tensor, baseline_id: int,
                       steps: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of each token's word embedding (summed over its dimensions) for the ``target``
    logits of token ids [N, L] (PAD on the right), on the path from every token replaced by ``baseline_id``
    (the tokenizer's padding token): [N, L] signed scores (0 on padding), and each sample's completeness gap,
    the scores' sum minus the logit difference between the text and the baseline (near 0: the path integral
    was computed finely enough)."""
    from captum.attr import LayerIntegratedGradients

    encoder = getattr(model.body, "encoder", None)
    if encoder is None or not hasattr(encoder, "get_input_embeddings"):
        raise UserError(f"backbone={model.backbone_name} has no token embeddings to attribute to (a TF-IDF "
                        "vectoriser: its per-n-gram weights are the linear head's coefficients). Per-token "
                        "attributions need an encoder backbone (minilm, hf).")
    model.eval()
    real = ids != PAD
    baseline = torch.where(real, torch.full_like(ids, baseline_id), ids)
    explainer = LayerIntegratedGradients(model, encoder.get_input_embeddings())
    scores, gap = explainer.attribute(ids, baselines=baseline, target=target, n_steps=steps,
                                      return_convergence_delta=True, internal_batch_size=len(ids) * 8)
    per_token = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    per_token[:, :scores.shape[1]] = scores.sum(-1).float()  # the encoder sees each batch cut to its longest text
    return (per_token * real).detach(), gap.detach()


def after_token_deletion(model: Classifier, ids: torch.Tensor, scores: torch.Tensor, baseline_id: int,
                         fraction: float) -> torch.Tensor:
    """Probabilities [N, classes] once the ``fraction`` most attributed tokens of each text (at least one) are
    replaced by ``baseline_id``."""
    out = ids.clone()
    for row, (text, score) in enumerate(zip(ids, scores, strict=True)):
        real = (text != PAD).nonzero().flatten()
        k = max(1, round(fraction * len(real)))
        out[row, real[score[real].topk(min(k, len(real))).indices]] = baseline_id
    with torch.no_grad():
        return model(out).softmax(1)
