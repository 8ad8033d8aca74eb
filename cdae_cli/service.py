"""Commands for operators of the service: the model registry, API keys, ``serve`` and ``worker``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import fail, run

__all__ = ["register"]

models_app = typer.Typer(no_args_is_help=True, help="The model registry (CDAE_HOME/models).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service.")


def models_list(all_versions: bool = typer.Option(False, "--all", help="Every version, not only the promoted."),
                as_json: bool = typer.Option(False, "--json", help="JSON instead of a table.")) -> None:
    """Registered models: name, version, data set, variables; `promoted` marks the version NAME serves."""
    from pipelines.registry import default_home, list_models

    models = list_models(all_versions=all_versions)
    if as_json:
        typer.echo(json.dumps([m.summary() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no models registered in {default_home() / 'models'}")
        return
    for m in models:
        names = ", ".join(v["name"] for v in m.summary()["variables"])
        typer.echo(f"{m.name}:v{m.version}\t{m.dataset}\t{names}\t{m.path}" + ("\tpromoted" if m.promoted else ""))


def models_register(checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
                    name: Optional[str] = typer.Option(None, help="Name [default: the checkpoint's data set].")) -> None:
    """Register a checkpoint directory as the next version of NAME (it serves NAME once promoted;
    the first version of a name is promoted as it is registered)."""
    from pipelines.registry import promoted_version, register

    def go():
        m = register(checkpoint, name=name)
        typer.echo(m.ref)
        if not m.promoted:
            typer.echo(f"{m.name} serves v{promoted_version(m.name)}; `cdae-med models promote {m.ref}` makes "
                       "this one serve it", err=True)

    run(go)


def models_promote(ref: str = typer.Argument(..., help="NAME:vN, the version NAME is to serve.")) -> None:
    """Make NAME:vN the version that `model=NAME` runs on (also to go back to an older version)."""
    from pipelines.registry import promote

    run(lambda: typer.echo(f"{promote(ref, by='command line').ref} now serves {ref.partition(':')[0]}"))


def _store():
    from service.config import get_settings
    from service.db import Store

    return Store(get_settings().database_url)


_ROLE = typer.Option("clinician", help="clinician (submit and read its own jobs) or admin (also training "
                                        "jobs and promoting models).")


def keys_create(name: str = typer.Option(..., help="Who or what the key is for."), role: str = _ROLE) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    def go():
        plain, key_id = _store().create_key(name, role=role)
        typer.echo(plain)
        typer.echo(f"key {key_id} ({name}, {role}) created; send it as the X-API-Key header. It is not shown again.",
                   err=True)

    run(go)


def keys_list() -> None:
    """API keys: id, name, role, first characters, revoked."""
    for k in _store().list_keys():
        typer.echo(f"{k['id']}\t{k['name']}\t{k['role']}\t{k['prefix']}...\t{'revoked' if k['revoked'] else 'active'}")


def keys_set_role(key_id: int = typer.Argument(..., help="The key's id (see `keys list`)."),
                  role: str = typer.Argument(..., help="clinician or admin.")) -> None:
    """Change a key's role (keys from before roles existed are clinicians)."""
    def go():
        if not _store().set_role(key_id, role):
            fail(f"no key {key_id}")
        typer.echo(f"key {key_id} is now {role}")

    run(go)


def keys_revoke(key_id: int = typer.Argument(..., help="The key's id (see `keys list`).")) -> None:
    """Revoke an API key."""
    if not _store().revoke_key(key_id):
        fail(f"no active key {key_id}")
    typer.echo(f"key {key_id} revoked")


def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port."),
          no_worker: bool = typer.Option(False, "--no-worker", help="The API only; workers run elsewhere."),
          queues: str = typer.Option("counterfactual,train", help="Queues of the embedded worker.")) -> None:
    """The counterfactual service: API, a worker and, with no CDAE_BROKER_URL, an embedded Redis."""
    from service.serve import serve as run_serve

    run_serve(host=host, port=port, worker=not no_worker, queues=queues)


def worker(queues: str = typer.Option("counterfactual,train", help="Comma-separated: counterfactual, train."),
           concurrency: int = typer.Option(1, help="Worker processes (one per GPU)."),
           gpu: Optional[int] = typer.Option(None, help="Use only this GPU (sets CUDA_VISIBLE_DEVICES)."),
           name: Optional[str] = typer.Option(None, help="Celery node name, e.g. gpu0@%h.")) -> None:
    """A Celery worker of the service (needs CDAE_BROKER_URL, or `cdae-med serve` on this machine)."""
    from service.serve import run_worker

    bad = set(queues.split(",")) - {"counterfactual", "train"}
    if bad:
        fail(f"unknown queue(s) {sorted(bad)}; queues: counterfactual, train")
    try:
        code = run_worker(queues, concurrency, gpu, name)
    except RuntimeError as err:
        fail(str(err))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    models_app.command("list")(models_list)
    models_app.command("register")(models_register)
    models_app.command("promote")(models_promote)
    keys_app.command("create")(keys_create)
    keys_app.command("list")(keys_list)
    keys_app.command("revoke")(keys_revoke)
    keys_app.command("set-role")(keys_set_role)
    app.add_typer(models_app, name="models")
    app.add_typer(keys_app, name="keys")
    app.command()(serve)
    app.command()(worker)
