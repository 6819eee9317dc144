"""Model checkpoints: ``NAME.safetensors`` (weights, with the recipe also stored in the file's own header
metadata) plus ``NAME.json`` (the recipe, and the epoch, metrics and run config, for people to read).

Loading refuses a sidecar of another format version, one that does not match the recipe's schema, and
one whose recipe differs from the copy inside the weights file: an edited sidecar would otherwise
silently feed the model wrongly sized or wrongly normalised input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write, atomic_write_text
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.recipe import FORMAT_VERSION, ModelRecipe
from transfer_cli.run_folder import RunFolder, RunStatus

_HEADER_KEY = "transfer_cli.recipe"
_SIDECAR_KEY = "transfer_cli.sidecar_sha256"  # the whole sidecar: its run config decides the held-out split


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_model(path: Path, state: dict[str, torch.Tensor], recipe: ModelRecipe, **extra: Any) -> None:
    """Weights (``state``, a Classifier's state_dict) with the recipe in the file header, and the JSON sidecar.
    Non-finite weights are refused: a diverged model must never become a checkpoint."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to write {path.name}: non-finite values in {bad[:3]}")
    described = json.dumps(recipe.to_dict(), sort_keys=True)
    sidecar = json.loads(json.dumps({"format": FORMAT_VERSION, "recipe": recipe.to_dict(), **extra}, default=str))
    header = {_HEADER_KEY: described, _SIDECAR_KEY: _sidecar_digest(sidecar)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2))


def _sidecar_digest(sidecar: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sidecar, sort_keys=True).encode()).hexdigest()


def read_sidecar(path: str) -> dict[str, Any]:
    """The checkpoint's sidecar, checked for format and schema (its ``recipe`` becomes a ModelRecipe)."""
    weights = Path(path).expanduser()
    sidecar = sidecar_path(weights)
    if not weights.is_file():
        raise UserError(f"checkpoint={path!r}: no such file. Pass a .safetensors file written by `transfer train` "
                        "(run_dir/checkpoints/best.safetensors or last.safetensors).")
    if not sidecar.is_file():
        raise UserError(f"checkpoint={path!r} has no sidecar {sidecar.name} beside it, which says how to rebuild "
                        "the model. Keep the .json file that `transfer train` wrote next to the weights.")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"checkpoint={path!r}: its sidecar {sidecar.name} is not valid JSON ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"checkpoint={path!r}: sidecar {sidecar.name} has format {found!r}; this transfer_cli reads "
                        f"format {FORMAT_VERSION}. Re-create the checkpoint with this version of `transfer train`.")
    meta["recipe"] = ModelRecipe.from_dict(meta.get("recipe"), f"checkpoint={path!r} sidecar {sidecar.name}")
    return meta


def load_model(path: str) -> tuple[Classifier, dict[str, Any]]:
    """The trained Classifier at ``path`` and its sidecar; refuses anything that does not fit together."""
    meta = read_sidecar(path)
    recipe: ModelRecipe = meta["recipe"]
    try:
        with safe_open(str(Path(path).expanduser()), framework="pt") as f:
            header = f.metadata() or {}
        stored = header.get(_HEADER_KEY)
        state = load_file(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's input problem
        raise UserError(f"checkpoint={path!r} could not be read as safetensors: {err}") from None
    if stored is None or _normalised(json.loads(stored), path) != recipe.to_dict():
        differs = _first_difference(json.loads(stored), recipe.to_dict()) if stored else "no recipe in the weights file"
        raise UserError(f"checkpoint={path!r}: the sidecar does not describe these weights ({differs}). "
                        "Was the .json edited or copied from another run? Restore the one written with the weights.")
    recorded = {k: (v.to_dict() if k == "recipe" else v) for k, v in meta.items()}
    if _SIDECAR_KEY not in header:
        raise UserError(f"checkpoint={path!r} was written by an older transfer_cli that did not protect its sidecar, "
                        "so which samples it was tested on cannot be verified. Train it again with this version.")
    if header[_SIDECAR_KEY] != _sidecar_digest(recorded):
        raise UserError(f"checkpoint={path!r}: its sidecar {sidecar_path(Path(path)).name} was changed after the weights "
                        "were written (its SHA-256 differs from the one in the weights file). The sidecar's run config "
                        "decides which samples were held out from training, so an edited one could score training "
                        "data. Restore the sidecar written with the weights.")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"checkpoint={path!r} holds non-finite values (NaN or inf) in {len(broken)} tensor(s), e.g. "
                        f"{', '.join(broken[:3])}: its predictions would be meaningless. Use a checkpoint of a run "
                        "that did not diverge (`transfer train` never writes one like this).")
    model = Classifier.from_recipe(recipe)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"checkpoint={path!r} does not fit the architecture its recipe describes: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with "
            f"another shape (e.g. {wrong[:3]})."
        )
    model.load_state_dict(state)
    return model, meta


def _normalised(raw: Any, path: str) -> Any:
    """The weights file's own recipe as the current schema writes it (older files lack newer defaults)."""
    try:
        return ModelRecipe.from_dict(raw, f"checkpoint={path!r} weights header").to_dict()
    except UserError:
        return raw


def _first_difference(stored: dict[str, Any], sidecar: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(stored) | set(sidecar)):
        a, b = stored.get(key), sidecar.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {b!r} in the sidecar but {a!r} in the weights file"
    return None


def checkpoint_paths(value: Any, log: Callable[[str], None] | None = None) -> list[str]:
    """``checkpoint=``: a file, a list, or a folder (a sweep's or a run's): the
    ``checkpoints/best.safetensors`` of every finished run under it, in path order (an unfinished or failed
    job's checkpoint is not its result, so a soup or ensemble of a sweep leaves it out, said via ``log``)."""
    paths = [str(value)] if isinstance(value, str) else [str(p) for p in value]
    found = []
    for path in paths:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            found.append(path)
            continue
        best = sorted(folder.rglob("checkpoints/best.safetensors"))
        finished = [p for p in best if _finished(p.parent.parent)]
        if not finished:
            raise UserError(f"checkpoint={path!r} is a folder without any checkpoints/best.safetensors of a finished "
                            "run below it. Pass a .safetensors file, a list of them, or a run or sweep folder.")
        if len(finished) < len(best) and log is not None:
            log(f"checkpoint={path}: {len(best) - len(finished)} run(s) below it did not finish and are left out: "
                + ", ".join(str(p.parent.parent) for p in best if p not in finished))
        found += [str(p) for p in finished]
    return found


def _finished(run_dir: Path) -> bool:
    return RunFolder(run_dir).status() is RunStatus.FINISHED
