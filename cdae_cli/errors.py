"""How the command reports bad input: one red line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import typer

__all__ = ["UserError", "fail", "run"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def run(fn):
    """Call ``fn``, turning the library's input errors into one clear line."""
    from cdae_med.checkpoint import CheckpointError
    from cdae_med.graph import GraphError

    try:
        return fn()
    except (UserError, GraphError, CheckpointError, ValueError, FileNotFoundError) as err:
        fail(str(err))
