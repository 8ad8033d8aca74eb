"""Causal graphs as data.

A :class:`CausalGraph` holds the variables of a structural causal model (name, unit,
normalisation, declared range, continuous or binary) and each variable's parents. A variable
normalised on a log scale (``log: true``) is a positive quantity whose causes multiply it, as a
volume's do: its normalised value is ln(value / centre) / scale (centre its geometric mean, scale
the standard deviation of its log), so the additive-noise mechanisms z = f(z_pa) + u of the causal
layer are the multiplicative law, and a counterfactual scales the subject's own value. It knows
its topological order and validates itself on construction: names unique, parents known,
no cycle. Built-in graphs are registered by name; any other graph is read from YAML::

    variables:
      - {name: age, unit: years, centre: 60, scale: 15, range: [40, 90]}
      - {name: brain_volume, unit: ml, centre: 1100, scale: 150, range: [700, 1600],
         parents: [age]}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = ["Variable", "CausalGraph", "GraphError", "builtin_graph", "load_graph", "BUILTIN_GRAPHS"]


class GraphError(ValueError):
    """A causal graph or an intervention on it is invalid."""


@dataclass(frozen=True)
class Variable:
    name: str
    unit: str = ""
    centre: float = 0.0
    scale: float = 1.0
    low: float = -math.inf
    high: float = math.inf
    binary: bool = False
    parents: tuple[str, ...] = ()
    log: bool = False  # normalised as ln(value / centre) / scale (see the module docstring)

    def normalise(self, value):
        return _normalise(value, self.centre, self.scale, self.log)

    def denormalise(self, value):
        return _denormalise(value, self.centre, self.scale, self.log)

    def check_value(self, value: float) -> None:
        """Raise GraphError if ``value`` is not a value this variable may take."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise GraphError(f"{self.name}: value {value!r} is not a finite number")
        if self.binary and value not in (0, 1):
            raise GraphError(f"{self.name} is binary: value must be 0 or 1, got {value:g}")
        if not self.low <= value <= self.high:
            unit = f" {self.unit}" if self.unit else ""
            raise GraphError(
                f"{self.name}={value:g}{unit} is outside the declared range "
                f"[{self.low:g}, {self.high:g}]{unit}"
            )


@dataclass(frozen=True)
class CausalGraph:
    name: str
    variables: tuple[Variable, ...]
    order: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = [v.name for v in self.variables]
        if not names:
            raise GraphError(f"graph {self.name!r} has no variables")
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise GraphError(f"graph {self.name!r}: duplicate variable name {n!r}")
            seen.add(n)
        for v in self.variables:
            if v.scale <= 0:
                raise GraphError(f"graph {self.name!r}: variable {v.name!r} needs scale > 0, got {v.scale}")
            if v.low > v.high:
                raise GraphError(f"graph {self.name!r}: variable {v.name!r} has range low > high")
            if v.log and (v.binary or v.centre <= 0 or not v.low > 0):
                raise GraphError(f"graph {self.name!r}: variable {v.name!r} is normalised on a log scale, so it "
                                 f"needs centre > 0 and a range above 0 and cannot be binary")
            for p in v.parents:
                if p not in seen:
                    raise GraphError(f"graph {self.name!r}: variable {v.name!r} has unknown parent {p!r}")
                if p == v.name:
                    raise GraphError(f"graph {self.name!r}: variable {v.name!r} is its own parent")
        sorter = TopologicalSorter({v.name: v.parents for v in self.variables})
        try:
            tuple(sorter.static_order())  # only to detect a cycle; the order kept is below
        except CycleError as err:
            cycle = " -> ".join(err.args[1])
            raise GraphError(f"graph {self.name!r} has a cycle: {cycle}") from None
        # Keep declaration order where the graph allows it, so indices are predictable.
        order = _stable_topological(names, {v.name: v.parents for v in self.variables})
        object.__setattr__(self, "order", order)

    # --- lookup -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise GraphError(f"unknown variable {name!r}; graph {self.name!r} has: {', '.join(self.names)}")

    def index(self, name: str) -> int:
        self[name]  # raises the clear error for an unknown name
        return self.names.index(name)

    def parents_of(self, name: str) -> tuple[str, ...]:
        return self[name].parents

    def descendants(self, name: str) -> tuple[str, ...]:
        """Every variable reachable from ``name`` along the arrows, in topological order."""
        self[name]
        reached = {name}
        for n in self.order:
            if any(p in reached for p in self[n].parents):
                reached.add(n)
        return tuple(n for n in self.order if n in reached and n != name)

    def adjacency(self) -> list[list[int]]:
        """A[i][j] = 1 when variable i is a parent of variable j (declaration indices)."""
        idx = {n: i for i, n in enumerate(self.names)}
        a = [[0] * len(self) for _ in self.variables]
        for v in self.variables:
            for p in v.parents:
                a[idx[p]][idx[v.name]] = 1
        return a

    def roles(self, interventions: Iterable[str]) -> dict[str, str]:
        """Each variable's part in an intervention, in topological order: ``intervened``,
        ``descendant`` (recomputed from its changed parents) or ``unchanged``."""
        do = set(interventions)
        for name in do:
            self[name]
        changed = {d for v in do for d in self.descendants(v)}
        return {n: "intervened" if n in do else "descendant" if n in changed else "unchanged" for n in self.order}

    # --- values -------------------------------------------------------------------------
    def check_interventions(self, do: Mapping[str, float]) -> None:
        """Raise a :class:`cdae_med.values.ValuesError` unless ``do`` is a valid, non-empty intervention."""
        from .values import parse_values

        parse_values(self, do, allow_empty=False)

    def normalise(self, values: Sequence[float] | Any) -> Any:
        """Own units -> normalised units, last axis in declaration order (numpy or torch)."""
        return _normalise(values, *self._vectors(values))

    def denormalise(self, values: Any) -> Any:
        return _denormalise(values, *self._vectors(values))

    def _vectors(self, like: Any) -> tuple[Any, Any, Any]:
        """centre, scale and the log-scale mask as vectors over the last axis of ``like``'s kind."""
        centre, scale, log = ([getattr(v, a) for v in self.variables] for a in ("centre", "scale", "log"))
        if hasattr(like, "new_tensor"):
            import torch

            return like.new_tensor(centre), like.new_tensor(scale), torch.tensor(log, device=like.device)
        import numpy as np

        return np.asarray(centre, dtype=float), np.asarray(scale, dtype=float), np.asarray(log, dtype=bool)

    # --- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = []
        for v in self.variables:
            d = asdict(v)
            d["parents"] = list(v.parents)
            d["range"] = [_finite_or_none(d.pop("low")), _finite_or_none(d.pop("high"))]
            if not v.log:
                del d["log"]  # as graphs without log-scale variables have always been written
            out.append(d)
        return {"name": self.name, "variables": out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "CausalGraph":
        if not isinstance(data, Mapping) or "variables" not in data:
            raise GraphError("a graph needs a 'variables' list")
        raw = data["variables"]
        if not isinstance(raw, list):
            raise GraphError("'variables' must be a list of mappings")
        variables = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or "name" not in item:
                raise GraphError(f"variable #{i + 1} needs at least a 'name'")
            item = dict(item)
            known = {"name", "unit", "centre", "scale", "range", "binary", "parents", "log"}
            extra = set(item) - known
            if extra:
                raise GraphError(f"variable {item['name']!r}: unknown keys {sorted(extra)}; allowed: {sorted(known)}")
            low, high = item.pop("range", None) or (None, None)
            binary = bool(item.get("binary", False))
            if binary and low is None and high is None:
                low, high = 0, 1
            try:
                variables.append(
                    Variable(
                        name=str(item["name"]),
                        unit=str(item.get("unit", "")),
                        centre=float(item.get("centre", 0.0)),
                        scale=float(item.get("scale", 1.0)),
                        low=-math.inf if low is None else float(low),
                        high=math.inf if high is None else float(high),
                        binary=binary,
                        parents=tuple(str(p) for p in item.get("parents", []) or []),
                        log=bool(item.get("log", False)),
                    )
                )
            except (TypeError, ValueError) as err:
                raise GraphError(f"variable {item['name']!r}: {err}") from None
        return cls(name=str(name or data.get("name", "custom")), variables=tuple(variables))


def _normalise(values: Any, centre: Any, scale: Any, log: Any) -> Any:
    """(values - centre) / scale, or ln(values / centre) / scale where ``log`` (numpy, torch or scalars)."""
    if not _any(log):
        return (values - centre) / scale
    if hasattr(values, "new_tensor"):
        import torch

        logged = torch.log(values.clamp_min(_TINY) / centre)
        return torch.where(torch.as_tensor(log, device=values.device), logged, values - centre) / scale
    import numpy as np

    values = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN (unknown) stays NaN; other columns masked
        logged = np.log(np.maximum(values, _TINY) / centre)
    return np.where(log, logged, values - centre) / scale


def _denormalise(values: Any, centre: Any, scale: Any, log: Any) -> Any:
    """Inverse of :func:`_normalise`."""
    if not _any(log):
        return values * scale + centre
    if hasattr(values, "new_tensor"):
        import torch

        return torch.where(torch.as_tensor(log, device=values.device),
                           centre * torch.exp((values * scale).clamp(max=_MAX_LOG)), values * scale + centre)
    import numpy as np

    values = np.asarray(values, dtype=float)
    return np.where(log, centre * np.exp(np.minimum(values * scale, _MAX_LOG)), values * scale + centre)


def _any(flags: Any) -> bool:
    return bool(flags.any()) if hasattr(flags, "any") else bool(flags)


_TINY = 1e-12  # a log-scale value at or below 0 is read as this (its range keeps valid values above 0)
_MAX_LOG = 80.0  # exp() of more overflows float32


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _stable_topological(names, parents) -> tuple[str, ...]:
    done: list[str] = []
    remaining = list(names)
    while remaining:
        nxt = next(n for n in remaining if all(p in done for p in parents[n]))
        done.append(nxt)
        remaining.remove(nxt)
    return tuple(done)


def load_graph(spec: str | Path) -> CausalGraph:
    """A built-in graph by name, or a graph read from a YAML file."""
    if str(spec) in BUILTIN_GRAPHS:
        return builtin_graph(str(spec))
    path = Path(spec)
    if not path.exists():
        raise GraphError(
            f"no built-in graph named {str(spec)!r} and no such file; built-in: {', '.join(BUILTIN_GRAPHS)}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GraphError(f"{path}: not valid YAML ({err})") from None
    return CausalGraph.from_dict(data, name=(data or {}).get("name", path.stem) if isinstance(data, dict) else None)


def builtin_graph(name: str) -> CausalGraph:
    try:
        return CausalGraph.from_dict(BUILTIN_GRAPHS[name], name=name)
    except KeyError:
        raise GraphError(f"no built-in graph {name!r}; built-in: {', '.join(BUILTIN_GRAPHS)}") from None


# Pendulum (CausalVAE): the paper's normalisation (angle (2, 42), light (104, 44) in index units)
# converted to degrees (one index unit = 0.9 deg); ranges of angle/light are CausalVAE's grid.
# Shadow ranges: extremes of synthetic_data.pendulum.shadow() on a 3001 x 3001 grid over the
# angle x light rectangle, rounded outward (len: 3 floor .. 12.577; pos: 2.008 .. 19.606).
BUILTIN_GRAPHS: dict[str, dict[str, Any]] = {
    "pendulum": {
        "variables": [
            {"name": "angle", "unit": "deg", "centre": 1.8, "scale": 37.8, "range": [-36.0, 38.7]},
            {"name": "light", "unit": "deg", "centre": 93.6, "scale": 39.6, "range": [54.0, 132.3]},
            {"name": "shadow_len", "unit": "canvas units", "centre": 7.5, "scale": 4.5,
             "range": [3.0, 12.6], "parents": ["angle", "light"]},
            {"name": "shadow_pos", "unit": "canvas units", "centre": 11.0, "scale": 8.0,
             "range": [2.0, 19.7], "parents": ["angle", "light"]},
        ]
    },
    # Morpho-MNIST (Castro 2019): t = 0.5 + Gamma(10, rate 5); i = 64 + 191 sigmoid(N(2(t - 2.5), 0.5)).
    # Normalisation is the paper's; ranges cover the mechanism's support in practice (P(t > 6) ~ 5e-5).
    # Thickness stops at 6 px: beyond it synthetic_data.morphomnist's 28 px digits fill their loops and
    # the measured thickness no longer follows the target (|error| p90 ~0.5 px at 6-7 px, ~0.02 below 5).
    "morphomnist": {
        "variables": [
            {"name": "thickness", "unit": "px", "centre": 3.4, "scale": 2.4, "range": [0.5, 6.0]},
            {"name": "intensity", "unit": "grey level (0-255)", "centre": 161.0, "scale": 94.0,
             "range": [64.0, 255.0], "parents": ["thickness"]},
        ]
    },
    # CausalCircuit (Brehmer 2022): all variables in [0, 1].
    "circuit": {
        "variables": [
            {"name": "arm", "unit": "", "centre": 0.5, "scale": 0.5, "range": [0.0, 1.0]},
            {"name": "blue", "unit": "", "centre": 0.5, "scale": 0.5, "range": [0.0, 1.0], "parents": ["arm"]},
            {"name": "green", "unit": "", "centre": 0.5, "scale": 0.5, "range": [0.0, 1.0], "parents": ["arm"]},
            {"name": "red", "unit": "", "centre": 0.5, "scale": 0.5, "range": [0.0, 1.0],
             "parents": ["arm", "blue", "green"]},
        ]
    },
    # Brain MRI (Pawlowski 2020; Ribeiro 2023): sex (0 female, 1 male), age -> brain volume;
    # age, brain volume -> ventricle volume. The volumes are on a log scale: brain atrophy and
    # ventricle growth are rates, so age and brain volume multiply a volume (synthetic_data.brain's
    # laws; Pawlowski 2020 models log volumes), and only in the log is the mechanisms' noise additive
    # (docs/design-notes.md, "Volumes on a log scale"). centre/scale: the synthetic cohort's geometric
    # mean and SD of the log. The ranges cover the cohort and its counterfactuals under do(age) over
    # [20, 95] and do(brain_volume) over its range, so every in-range value can be realised on every
    # subject.
    "brain": {
        "variables": [
            {"name": "age", "unit": "years", "centre": 60.0, "scale": 20.0, "range": [20.0, 95.0]},
            {"name": "sex", "unit": "0=female, 1=male", "binary": True},
            {"name": "brain_volume", "unit": "ml", "centre": 1068.0, "scale": 0.137, "log": True,
             "range": [550.0, 1800.0], "parents": ["age", "sex"]},
            {"name": "ventricle_volume", "unit": "ml", "centre": 32.3, "scale": 0.55, "log": True,
             "range": [3.0, 300.0], "parents": ["age", "brain_volume"]},
        ]
    },
}
