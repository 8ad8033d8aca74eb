"""Values of a causal graph's variables, parsed and checked in one place.

Every entry point (the command line's ``--do`` and ``--covariates``, the API's JSON, batch
manifests, the generators' ``counterfactual``, the counterfactual pipeline) turns what it was
given into checked floats here, so a value means the same thing and fails with the same message
wherever it comes from:

- a number (int or float, not bool), or text holding one (``"70"``, ``" 70.5 "``);
- for a binary variable, a level name its unit declares (``sex`` with unit ``0=female, 1=male``
  takes ``F``, ``female``, ``M``, ``male``, ``0``, ``1``);
- with ``n`` given (the generators, batched interventions), an array-like of one value per
  sample; a scalar is broadcast to all ``n``.

Each problem is one clear line naming the variable (unknown name, not a number, not finite,
outside the declared range, not a level of a binary variable, wrong number of values); all of a
mapping's problems are raised together as one :class:`ValuesError`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import numpy as np

from .graph import CausalGraph, GraphError, Variable

__all__ = ["ValuesError", "parse_values", "parse_value", "parse_assignments", "levels"]


class ValuesError(GraphError):
    """One or more values of a graph's variables are invalid; ``problems`` holds one line each."""

    def __init__(self, problems: list[str], what: str = "values"):
        self.problems = list(problems)
        self.what = what
        super().__init__("; ".join(self.problems))


def levels(var: Variable) -> dict[str, float]:
    """Names a binary variable's values may be given by: '0=female, 1=male' ->
    {'0': 0, '1': 1, 'female': 0, 'f': 0, 'male': 1, 'm': 1} (lower case)."""
    out = {"0": 0.0, "1": 1.0}
    for code, name in re.findall(r"([01])\s*=\s*([A-Za-z][\w-]*)", var.unit or ""):
        out[name.lower()] = float(code)
        out.setdefault(name[0].lower(), float(code))
    return out


def _number(var: Variable, raw: Any) -> float:
    """One raw value of ``var`` -> a float, or GraphError saying why not (range not yet checked)."""
    if isinstance(raw, str):
        text = raw.strip()
        if var.binary and text.lower() in levels(var):
            return levels(var)[text.lower()]
        try:
            return float(text)
        except ValueError:
            names = sorted(k for k in levels(var) if not k.isdigit())
            hint = f" (or one of {names})" if var.binary and names else ""
            raise GraphError(f"{var.name}: {text[:40]!r} is not a number{hint}") from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, np.integer, np.floating)):
        raise GraphError(f"{var.name}: {str(raw)[:40]!r} is not a number")
    try:
        return float(raw)
    except OverflowError:  # an int too large for a float
        raise GraphError(f"{var.name}: value {str(raw)[:20]}... is not a finite number") from None


def parse_value(var: Variable, raw: Any) -> float:
    """One value of ``var`` from a number or text, checked (finite, binary level, declared range)."""
    value = _number(var, raw)
    var.check_value(value)
    return value


def _array(var: Variable, raw: Any, n: int) -> np.ndarray:
    if hasattr(raw, "detach"):  # a torch tensor, without importing torch here
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, (str, int, float, bool, np.integer, np.floating, np.bool_)):
        arr = np.full(n, parse_value(var, raw))
    else:
        arr = np.asarray(raw)
        if arr.dtype.kind not in "iuf":
            raise GraphError(f"{var.name}: values must be numbers, got {str(raw)[:40]!r}")
        if arr.ndim > 1 or (arr.ndim == 1 and len(arr) not in (1, n)):
            raise GraphError(f"{var.name}: {arr.size} values for a batch of {n}; give a scalar or one value per sample")
        arr = np.broadcast_to(arr.astype(np.float64).reshape(-1), (n,)).copy()
    for v in np.unique(arr) if n else ():
        var.check_value(float(v))
    if np.isnan(arr).any():
        var.check_value(math.nan)
    return arr


def parse_values(graph: CausalGraph, raw: Mapping[str, Any] | None, *, what: str = "interventions",
                 n: int | None = None, allow_empty: bool = True) -> dict[str, Any]:
    """A mapping of variable -> raw value(s) -> variable -> checked float (or, with ``n``, an (n,)
    float64 array). ``what`` names the mapping in messages; ``allow_empty=False`` makes an empty
    mapping an error (an intervention needs at least one variable)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValuesError([f"{what} must be a mapping of variable to value, got {type(raw).__name__}"], what)
    if not raw and not allow_empty:
        example = graph.variables[0].name
        raise ValuesError([f"no {what} given; e.g. {example}=<value>"], what)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in raw.items():
        try:
            var = graph[str(name)]
            out[var.name] = parse_value(var, value) if n is None else _array(var, value, n)
        except GraphError as err:
            problems.append(str(err))
    if problems:
        raise ValuesError(problems, what)
    return out


def parse_assignments(items: Iterable[str], option: str = "--do") -> dict[str, str]:
    """['age=70', 'sex=F'] -> {'age': '70', 'sex': 'F'} (text, for :func:`parse_values`).
    A malformed item or a name given twice is a :class:`ValuesError`."""
    out: dict[str, str] = {}
    problems = []
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            problems.append(f"{option} {item!r} is not of the form variable=value")
        elif name in out:
            problems.append(f"{option}: {name!r} is given twice")
        else:
            out[name] = value
    if problems:
        raise ValuesError(problems, option)
    return out
