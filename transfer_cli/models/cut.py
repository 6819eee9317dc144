"""``backbone.cut=k``: keep the body's first k stages; the features are their output, pooled.

A network's last stages are the most specific to its source task, so an earlier layer can transfer better
(Yosinski et al. 2014); ``transfer rank`` scores such cuts like any other candidate, and ``transfer train``
trains one. The body is traced with torchvision's FX feature extractor, which returns the output of one
node and leaves out every module after it, so a cut body holds (and trains, freezes, checkpoints) only the
parameters of its stages, under their original names.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.feature_extraction import (
    DualGraphModule,
    create_feature_extractor,
    get_graph_node_names,
)

from transfer_cli.errors import UserError
from transfer_cli.models.stages import Stage, complete_stages, describe_stage, in_stage

CUT_NODE = "cut"


class CutBody(nn.Module):
    """The traced first stages, then global average pooling: spatial maps ([N, C, H, W]) over H and W,
    token sequences ([N, L, C]) over the tokens."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.trunk(x)[CUT_NODE])


def pooled(out: torch.Tensor) -> torch.Tensor:
    return out.flatten(2).mean(2) if out.dim() == 4 else out.mean(1) if out.dim() == 3 else out


def cut_body(name: str, body: nn.Module, stages: list[Stage], channels: int, cut: int,
             probe_size: int) -> tuple[CutBody, int, list[Stage]]:
    """(the body of backbone ``name`` with only its first ``cut`` stages, its feature width, its stages);
    ``probe_size`` is an input size the body takes (one eval-mode forward of a blank image measures the width)."""
    last = len(stages) - 1
    if not 1 <= cut <= last:
        listing = "; ".join(f"{i + 1}: {describe_stage(s)}" for i, s in enumerate(stages))
        raise UserError(f"backbone.cut={cut} is not allowed for backbone={name}: it keeps the first k stages, "
                        f"k from 1 to {last} (null keeps all {len(stages)}). Stages: {listing}.")
    cut_one = CutBody(_traced_trunk(name, body, stages, cut))
    kept = complete_stages(cut_one, [[f"trunk.{p}" for p in stage] for stage in stages[:cut]])
    was_training = cut_one.training
    cut_one.eval()
    with torch.no_grad():
        out = cut_one.trunk(torch.zeros(1, channels, probe_size, probe_size))[CUT_NODE]
    cut_one.train(was_training)
    if not isinstance(out, torch.Tensor) or not 2 <= out.dim() <= 4:
        raise UserError(f"backbone.cut={cut}: backbone={name}'s traced graph gives {type(out).__name__} "
                        f"{list(out.shape) if isinstance(out, torch.Tensor) else ''} before stage {cut + 1}, not a "
                        "feature map or token sequence, so it cannot be cut there.")
    return cut_one, int(pooled(out).shape[1]), kept


def _in_stage(node: str, stage: Stage, params: set[str]) -> bool:
    """Whether the traced node ``node`` (a qualified name) runs in ``stage``: under one of its module names, or,
    where the stage lists parameter names (timm; ``params`` are the body's), in the module holding one of them
    (its call, or a function node reading its weights)."""
    modules = {p.rpartition(".")[0] for p in stage if p in params} - {""}
    return in_stage(node, stage) or node in modules or node.rpartition(".")[0] in modules


def _traced_trunk(name: str, body: nn.Module, stages: list[Stage], cut: int) -> nn.Module:
    """The body's graph up to the output of stage ``cut``, as a module holding only what that part uses."""
    tracer = {}
    if name.startswith("timm/"):  # timm marks the modules and functions FX must not trace into
        from timm.layers import get_notrace_functions, get_notrace_modules

        tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    try:  # FX tracing fails on data-dependent control flow, with whatever error the model raises
        nodes = get_graph_node_names(body, tracer_kwargs=tracer)[1]  # eval mode adds no stage boundary
        output = _stage_output(name, body, stages, cut, nodes)
        full = create_feature_extractor(body, {output: CUT_NODE}, tracer_kwargs=tracer)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"backbone.cut={cut}: backbone={name} cannot be cut (tracing its forward failed: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None
    # A traced shape assertion is a side effect that keeps its inputs alive: ViT asserts on each block's input,
    # which would keep every later block in the cut body. Without them, dead-code elimination drops those blocks.
    for graph in (full.train_graph, full.eval_graph):
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is torch._assert:
                graph.erase_node(node)
        graph.eliminate_dead_code()
    trunk = DualGraphModule(body, full.train_graph, full.eval_graph)  # copies only the modules still used
    return trunk.train(body.training)


def _stage_output(name: str, body: nn.Module, stages: list[Stage], cut: int, nodes: list[str]) -> str:
    """Of the traced graph's ``nodes`` (qualified names, in execution order), the one the next stage reads: the
    node just before that stage's first (stages run one after another)."""
    following = stages[cut]
    params = {n for n, _ in body.named_parameters()}
    first = next((i for i, n in enumerate(nodes) if _in_stage(n, following, params)), None)
    if not first:
        raise UserError(f"backbone.cut={cut}: the traced graph of backbone={name} has no node of stage "
                        f"{cut + 1} ({describe_stage(following)}) after its input, so it cannot be cut there.")
    return nodes[first - 1]

