"""Your own loss, backbone or dataset, found through Python entry points of installed distributions.

A distribution declares, in its pyproject.toml (docs/plugins.md walks through a whole example)::

    [project.entry-points."ncssl_tune.losses"]
    decorrelation = "my_ssl.losses:decorrelation_loss"

and the name (``decorrelation``) becomes a value of ``loss.method`` like the built-in ones. The groups:

- ``ncssl_tune.losses``: a function ``loss(z1, z2, *, key: type = default, ...) -> dict[str, Tensor]`` on two
  ``(N, D)`` views. Its keyword-only parameters are the loss's parameters (``loss.<name>.<key>`` in a search-space
  file, in ``space`` and after ``--set``): each has a default and an annotation ``float``, ``int``, ``bool`` or
  ``str``, optionally ``Annotated[float, Range(gt=0)]`` for bounds. It returns ``"loss"`` (the scalar to minimise)
  and any further named terms, each a scalar whose name starts with ``loss_`` (logged beside the metrics).
- ``ncssl_tune.backbones``: ``build(in_channels, image_size) -> nn.Module`` mapping ``(N, C, H, W) -> (N, F)``,
  with an ``out_dim`` attribute (F).
- ``ncssl_tune.datasets``: a ``DataSource`` or a loader ``load(*, root, seed, test_fraction, image_size,
  synthetic) -> ImageData`` (core/data.py).

Only installed distributions are read, never an import path taken from YAML: what runs is what the user
installed. Every entry point is loaded and checked once per process, before anything starts; a broken one (an
import error, a wrong signature, a name that a built-in or another plugin already has) is a PluginError naming
the entry point, and the CLI exits with status 2.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch

from ncssl_tune.core.data import DATASETS, DataSource
from ncssl_tune.core.losses import LOSSES, _full_precision
from ncssl_tune.core.models import BACKBONES

GROUPS: dict[str, dict[str, Any]] = {
    "ncssl_tune.losses": LOSSES,
    "ncssl_tune.backbones": BACKBONES,
    "ncssl_tune.datasets": DATASETS,
}
BUILTIN = {group: frozenset(registry) for group, registry in GROUPS.items()}  # before any plugin joins them
PARAM_TYPES = (float, int, bool, str)
LOADER_KEYWORDS = ("root", "seed", "test_fraction", "image_size", "synthetic")  # what load_dataset passes


class PluginError(ValueError):
    """A plugin that cannot be used; str() names the entry point and what is wrong with it."""


@dataclass(frozen=True)
class Range:
    """Bounds of a plugin loss parameter, given as ``Annotated[float, Range(gt=0)]``; checked like the built-in
    parameters' bounds (config.bounded)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Param:
    """One declared parameter of a plugin loss: config.install_plugins turns these into its params dataclass."""

    name: str
    type: type
    default: Any
    bounds: dict[str, float]


_state: dict[str, Any] = {"params": None}  # the checked plugins' loss parameters, once loaded in this process


def load_plugins() -> dict[str, list[Param]]:
    """Load, check and register every installed plugin (once per process); returns each plugin loss's parameters."""
    if _state["params"] is None:
        eps = [ep for group in GROUPS for ep in entry_points(group=group)]
        _state["params"] = register(eps)
    return _state["params"]


def describe(ep: EntryPoint) -> str:
    """How a message names an entry point: its name, its target, its group and the distribution declaring it."""
    dist = getattr(ep, "dist", None)
    source = f", distribution {dist.name}" if dist is not None else ""
    return f"plugin entry point {ep.name} = {ep.value} (group {ep.group}{source})"


def register(eps: Iterable[EntryPoint]) -> dict[str, list[Param]]:
    """Check every entry point, then add them all to the core's registries (none is added if one is broken)."""
    checked: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    params: dict[str, list[Param]] = {}
    for ep in eps:
        if ep.group not in GROUPS:
            raise PluginError(f"{describe(ep)}: unknown group; choose from: {', '.join(GROUPS)}")
        taken = checked[ep.group]
        if ep.name in BUILTIN[ep.group]:
            raise PluginError(f"{describe(ep)}: {ep.name!r} is already a built-in name ({', '.join(sorted(BUILTIN[ep.group]))}); "
                              "give the entry point another name")
        if ep.name in taken:
            raise PluginError(f"{describe(ep)}: another installed plugin already declares {ep.name!r} in {ep.group}; "
                              "uninstall one of them or rename its entry point")
        try:
            obj = ep.load()
        except Exception as e:  # a plugin's import can fail in any way; the user needs to know which one
            raise PluginError(f"{describe(ep)}: cannot be loaded: {type(e).__name__}: {e}") from e
        try:
            if ep.group == "ncssl_tune.losses":
                params[ep.name] = loss_params(obj)
                obj = _full_precision(obj)  # like the built-in losses: float32, outside autocast
                _smoke_loss(obj, params[ep.name])
            elif ep.group == "ncssl_tune.backbones":
                _check_callable(obj, ("in_channels", "image_size"), "a backbone builder")
            else:
                obj = obj if isinstance(obj, DataSource) else DataSource(_check_loader(obj))
        except PluginError as e:
            raise PluginError(f"{describe(ep)}: {e}") from None
        taken[ep.name] = obj
    for group, found in checked.items():
        GROUPS[group].update(found)
    return params


def loss_params(fn: Any) -> list[Param]:
    """The declared parameters of a plugin loss: its keyword-only parameters, each typed and with a default."""
    if not callable(fn):
        raise PluginError(f"expected a loss function, got {type(fn).__name__}")
    sig = inspect.signature(fn)
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2 or any(p.default is not p.empty for p in positional):
        raise PluginError(f"a loss takes exactly two positional arguments (z1, z2) and keyword-only parameters, "
                          f"got {fn.__name__}{sig}")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:  # an annotation naming something the module does not define
        raise PluginError(f"cannot read the annotations of {fn.__name__}: {e}") from e
    out = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PluginError(f"*{p.name} / **{p.name} cannot be declared parameters; name each one "
                              f"(got {fn.__name__}{sig})")
        if p.kind != p.KEYWORD_ONLY:
            continue
        tp, bounds = hints.get(p.name), {}
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            bounds = {k: v for r in extras if isinstance(r, Range) for k, v in r.bounds().items()}
        if tp not in PARAM_TYPES or p.default is p.empty:
            raise PluginError(f"parameter {p.name!r} needs a default and one of the annotations float, int, bool, "
                              f"str (optionally Annotated[float, Range(...)]), got {p}")
        out.append(Param(p.name, tp, p.default, bounds))
    return out


def _smoke_loss(fn: Callable, params: list[Param]) -> None:
    """Call the loss once on two small views with its defaults: the contract is checked before any trial starts."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(16, 8, generator=g).requires_grad_() for _ in range(2))  # (N, D)
    try:
        out = fn(z1, z2, **{p.name: p.default for p in params})
    except Exception as e:  # whatever the plugin raises, the message names it
        raise PluginError(f"calling it on two (16, 8) views with its default parameters raised "
                          f"{type(e).__name__}: {e}") from e
    if not isinstance(out, dict) or "loss" not in out:
        raise PluginError(f"a loss returns a dict of named terms with the key 'loss', got {type(out).__name__}"
                          + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
    for key, value in out.items():
        if key != "loss" and not str(key).startswith("loss_"):
            raise PluginError(f"term {key!r}: named terms start with 'loss_' (they are logged beside the metrics, "
                              "whose names they must not take)")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise PluginError(f"term {key!r} must be a scalar tensor, got {getattr(value, 'shape', type(value))}")
    if not out["loss"].requires_grad:
        raise PluginError("its 'loss' carries no gradient from z1, z2: it must be computed from them with torch")


def _check_callable(obj: Any, names: tuple[str, ...], what: str) -> None:
    if not callable(obj):
        raise PluginError(f"expected {what}, got {type(obj).__name__}")
    params = inspect.signature(obj).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in names if n not in params]
    if missing:
        raise PluginError(f"{what} is called with the keywords {', '.join(names)}; "
                          f"{getattr(obj, '__name__', obj)}{inspect.signature(obj)} lacks {', '.join(missing)}")


def _check_loader(obj: Any) -> Callable:
    _check_callable(obj, LOADER_KEYWORDS, "a DataSource or a dataset loader")
    return obj
