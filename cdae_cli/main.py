"""The ``cdae-med`` Typer application: research commands and service commands on one app."""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Causal counterfactuals of images with Causal Diffusion Autoencoders.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


from . import research, service  # noqa: E402,F401  (each adds its commands to app)
research.register(app)
service.register(app)

if __name__ == "__main__":
    app()
