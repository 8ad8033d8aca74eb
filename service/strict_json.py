"""JSON as the API accepts it: :func:`loads` and the route class :class:`StrictJSONRoute`.

The standard library's parser takes things a request should not carry and fails on others in
ways that are not a one-line reason: a key given twice (the last silently wins), NaN and
Infinity (not JSON), numbers too large for any setting (``int`` of thousands of digits, which
Python refuses with a bare ValueError past 4,300; ``1e999`` read as inf), and nesting deep
enough to raise RecursionError. Here each is a :class:`JSONProblem` saying which, and the
route class turns one in a JSON body into a 422 (FastAPI itself answers 400 "There was an error
parsing the body"); multipart fields go through :func:`loads` in ``service.uploads``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Coroutine

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

__all__ = ["JSONProblem", "loads", "StrictJSONRoute", "MAX_DEPTH", "MAX_INT_DIGITS"]

MAX_DEPTH = 32  # objects and arrays inside each other; a training request needs 3
MAX_INT_DIGITS = 30  # every integer the API takes (steps, seeds, sizes) has far fewer


class JSONProblem(ValueError):
    """Text that is not JSON the API accepts; the message is the one-line reason."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JSONProblem(f"the key {key[:40]!r} is given twice")
        out[key] = value
    return out


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JSONProblem(f"an integer of {digits:,} digits is too large (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def _constant(name: str) -> float:
    raise JSONProblem(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (without recursion); stops past MAX_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads(raw: str | bytes) -> Any:
    """Parse JSON; :class:`JSONProblem` with the reason for what the API does not accept."""
    try:
        value = json.loads(raw, object_pairs_hook=_object, parse_int=_integer, parse_float=_float,
                           parse_constant=_constant)
    except json.JSONDecodeError as err:
        raise JSONProblem(f"not valid JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise JSONProblem(f"nested more than {MAX_DEPTH} levels deep") from None
    except UnicodeDecodeError:
        raise JSONProblem("not UTF-8 text") from None
    if _depth(value) > MAX_DEPTH:
        raise JSONProblem(f"nested more than {MAX_DEPTH} levels deep")
    return value


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except JSONProblem as err:
                raise HTTPException(422, f"body: {err}") from None
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by :func:`loads` (FastAPI's custom Request and
    APIRoute class pattern): a problem is a 422 with its reason."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
