"""One small generic registry: name -> builder, with config checking against the builder's signature."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from transfer_cli.errors import UserError, choices

_SCALARS = (int, float, bool, str)


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric builder argument, declared as ``Annotated[float, Range(gt=0)]`` and checked
    (with the key named in the error) before any work starts."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return (math.isfinite(value) and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        lower = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        upper = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        return " and ".join(b for b in (lower, upper) if b) or "finite"


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # momentum, dropout, label smoothing ...
Count = Annotated[int, Range(ge=1)]


class Registry:
    """Maps names to builder functions or classes.

    ``kind`` is the config key the registry serves (``optimizer``, ``method`` ...), so error messages
    name the exact key a user has to change.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._families: dict[str, Callable[[str], Callable[..., Any]]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn

        return add

    def add(self, name: str, fn: Callable[..., Any]) -> None:
        self.register(name)(fn)

    def add_family(self, prefix: str, factory: Callable[[str], Callable[..., Any]]) -> None:
        """Names ``prefix<anything>`` are served by ``factory(anything)``: a whole library's models
        (``timm/<model>``) without registering each one."""
        self._families[prefix] = factory

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        if name in self._entries:
            return self._entries[name]
        for prefix, factory in self._families.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                return factory(name[len(prefix):])
        families = "".join(f", or {prefix}<name>" for prefix in self._families)
        raise UserError(f"{self.kind}={name!r} is not a known {self.kind}. Known: {choices(self.names(), 60)}{families}.")

    def check(self, cfg: Mapping[str, Any], provided: tuple[str, ...] = ()) -> None:
        """Reject keys the builder does not take and values of the wrong type, before any work starts.

        ``provided`` names the arguments the pipeline passes itself (e.g. ``params``), which a
        config may not set.
        """
        name = cfg.get("name")
        fn = self.get(name)
        params = _parameters(fn)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn, include_extras=True)
        allowed = [k for k, p in params.items() if k not in provided and p.kind is not p.VAR_KEYWORD]
        required = [k for k in allowed if params[k].default is inspect.Parameter.empty
                    and params[k].kind is not params[k].VAR_POSITIONAL]
        unset = [k for k in required if _is_unset(cfg, k)]
        if unset:
            raise UserError(f"{self.kind}={name} needs {', '.join(f'{self.kind}.{k}' for k in unset)}: its YAML "
                            f"(conf/{self.kind}/{name}.yaml) leaves it to you (???). Set it on the command line, "
                            f"e.g. {self.kind}.{unset[0]}=VALUE.")
        absent = [k for k in required if k not in cfg]
        if absent:
            raise UserError(
                f"{self.kind} {name!r} needs {', '.join(f'{self.kind}.{k}' for k in absent)}, which the config "
                f"does not set. Its YAML (conf/{self.kind}/{name}.yaml) sets every key; was one removed with ~?"
            )
        for key, value in cfg.items():
            if key == "name":
                continue
            if key in provided or (key not in params and not takes_any):
                raise UserError(
                    f"{self.kind}.{key} is not an option of {self.kind} {name!r}. "
                    f"Allowed keys: {choices(['name', *allowed])}."
                )
            hint = hints.get(key)
            if hint is not None and not _matches(value, hint):
                raise UserError(
                    f"{self.kind}.{key}={_plain(value)!r} is not allowed for {self.kind} {name!r}. "
                    f"Allowed: {_describe(hint)}."
                )

    def build(self, cfg: Mapping[str, Any], **provided: Any) -> Any:
        """Check ``cfg`` and call the builder named by ``cfg['name']`` with the rest as keyword arguments."""
        self.check(cfg, tuple(provided))
        kwargs = {k: _plain(v) for k, v in cfg.items() if k != "name"}
        return self.get(cfg["name"])(**provided, **kwargs)


def _is_unset(cfg: Mapping[str, Any], key: str) -> bool:
    """A ``???`` value of an OmegaConf config."""
    from omegaconf import OmegaConf

    return OmegaConf.is_config(cfg) and key in cfg.keys() and OmegaConf.is_missing(cfg, key)  # noqa: SIM118 - `in cfg` is False for ???


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    return params


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so builders never see ListConfig/DictConfig."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def _matches(value: Any, hint: Any) -> bool:
    value = _plain(value)
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        inner, *extras = typing.get_args(hint)
        ranges = [e for e in extras if isinstance(e, Range)]
        return _matches(value, inner) and all(r.holds(float(value)) for r in ranges)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, Sequence):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in _SCALARS:
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        inner, *extras = typing.get_args(hint)
        bounds = " and ".join(e.describe() for e in extras if isinstance(e, Range))
        return f"{_describe(inner)} {bounds}".strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(hint)
        return f"a list of ({_describe(args[0])})" if args else "a list"
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + choices(typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
