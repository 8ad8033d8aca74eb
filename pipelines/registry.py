"""The model registry: trained checkpoints filed under a name, in versions; ``NAME`` means the
version promoted to serve it.

    CDAE_HOME/models/NAME/v1/   checkpoint.json, weights.pt, metrics.json, ...  (+ registry.json)
    CDAE_HOME/models/NAME/v2/   ...
    CDAE_HOME/models/NAME/promoted.json   {"version": 1, "promoted_at": ..., "by": ...}

A new version serves ``NAME`` only once it is promoted (:func:`promote`, ``cdae-med models
promote NAME:vN``), never because it is newest. The first version registered under a name is
promoted as it is registered, so a fresh install serves what it trained. A name registered
before promotion existed (no ``promoted.json``) serves its newest version until its next
registration or promotion records one (the next registration records the version it served).

``CDAE_HOME`` defaults to ``~/.cdae-med``. A version directory is filled beside its final
place and renamed into it, so a reader never sees half a model and two processes that
register at once get two different versions. The optimizer state (``training.pt``) is not
copied: a registered model is for inference. ``registry.json`` records where the model came
from; registering again from the same ``source`` (a job id) returns the version already
there, which makes a re-run training job safe.

A model shipped with cdae-med (``SHIPPED``) is registered the first time it is asked for, its source
naming its weights; a cdae-med that ships other weights registers them as a new version, which serves
where the shipped one served (a model the user promoted keeps serving).

Reading the registry needs no torch: the graph comes from ``checkpoint.json``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdae_med.graph import CausalGraph

from .settings import RuntimeSettings

log = logging.getLogger("cdae_med")

__all__ = ["RegistryError", "RegisteredModel", "default_home", "models_dir", "register", "list_models",
           "resolve", "shipped_models", "SHIPPED", "promote", "promoted_version", "NAME_RE"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" would take a trailing newline
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)\Z")
_PROMOTED = "promoted.json"
# Inference files only; training.pt (optimizer state) stays with the run.
_COPIED = ("checkpoint.json", "weights.pt", "metrics.json", "counterfactual_grid.png", "reference.nii.gz",
           "reference_mask.nii.gz")


# Trained models that ship as package data (each directory's README.md says how it was made).
SHIPPED = {"brain": Path(__file__).resolve().parent / "models" / "brain"}
SHIPPED_SOURCE = "shipped with cdae-med"  # how a registered shipped model's source begins


class RegistryError(ValueError):
    """An unknown model or version, a bad name, or a directory that is not a checkpoint."""


def default_home() -> Path:
    """The data directory: ``$CDAE_HOME`` or ``~/.cdae-med`` (:class:`pipelines.settings.RuntimeSettings`)."""
    return RuntimeSettings().home


def models_dir(home: str | Path | None = None) -> Path:
    return (Path(home) if home is not None else default_home()) / "models"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: int
    path: Path
    dataset: str
    registered_at: float
    source: str | None
    meta: dict[str, Any]  # checkpoint.json
    promoted: bool = False  # this version serves NAME

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    @property
    def graph(self) -> CausalGraph:
        return CausalGraph.from_dict(self.meta["graph"])

    def summary(self) -> dict[str, Any]:
        graph = self.meta.get("graph", {})
        return {"name": self.name, "version": self.version, "dataset": self.dataset, "path": str(self.path),
                "registered_at": self.registered_at, "source": self.source, "promoted": self.promoted,
                "image": self.meta.get("image", {}), "variant": self.meta.get("variant", "causaldiffae"),
                "variables": [{"name": v["name"], "unit": v.get("unit", ""), "range": v.get("range"),
                               "binary": v.get("binary", False), "parents": v.get("parents", [])}
                              for v in graph.get("variables", [])]}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"model name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    return name


def _read(path: Path, name: str, version: int) -> RegisteredModel:
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    try:
        info = json.loads((path / "registry.json").read_text())
    except (OSError, ValueError):
        info = {}
    return RegisteredModel(name=name, version=version, path=path, dataset=str(meta.get("dataset", "")),
                           registered_at=float(info.get("registered_at", path.stat().st_mtime)),
                           source=info.get("source"), meta=meta,
                           promoted=_serving(path.parent, _versions(path.parent.parent, name)) == version)


def _recorded(name_dir: Path) -> int | None:
    try:
        version = json.loads((name_dir / _PROMOTED).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and version >= 1 else None


def _serving(name_dir: Path, versions: list[int]) -> int | None:
    """The version NAME serves: the promoted one, or the newest where none was ever recorded."""
    recorded = _recorded(name_dir)
    return recorded if recorded is not None else (versions[-1] if versions else None)


def _record_promotion(name_dir: Path, version: int, by: str | None, only_if_none: bool = False) -> bool:
    """Write promoted.json atomically; with ``only_if_none``, only where there is none yet (the
    first writer wins). Returns whether it was written."""
    fd, tmp = tempfile.mkstemp(prefix=".promoted-", dir=name_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": version, "promoted_at": time.time(), "by": by}, fh)
        if not only_if_none:
            os.replace(tmp, name_dir / _PROMOTED)
            return True
        try:
            os.link(tmp, name_dir / _PROMOTED)  # fails if it exists
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def promoted_version(name: str, *, home: str | Path | None = None) -> int | None:
    """The version ``name`` serves, or None if it has no versions."""
    base = models_dir(home)
    return _serving(base / check_name(name), _versions(base, name))


def promote(ref: str, *, home: str | Path | None = None, by: str | None = None) -> RegisteredModel:
    """Make ``NAME:vN`` the version that ``NAME`` serves (also to go back to an older one)."""
    name, _, ver = str(ref).partition(":")
    if not ver:
        raise RegistryError(f"name the version to promote: {name}:vN")
    model = resolve(ref, home=home)
    _record_promotion(model.path.parent, model.version, by)
    return _read(model.path, model.name, model.version)


def _versions(base: Path, name: str) -> list[int]:
    d = base / name
    if not d.is_dir():
        return []
    out = []
    for child in d.iterdir():
        m = _VERSION_RE.match(child.name)
        if m and (child / "checkpoint.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def register(checkpoint_dir: str | Path, name: str | None = None, *, home: str | Path | None = None,
             source: str | None = None) -> RegisteredModel:
    """Copy a checkpoint into the registry as the next version of ``name`` (default: its data set)."""
    src = Path(checkpoint_dir)
    try:
        meta = json.loads((src / "checkpoint.json").read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{src}: not a checkpoint directory (checkpoint.json: {type(err).__name__})") from None
    if not (src / "weights.pt").is_file():
        raise RegistryError(f"{src}: no weights.pt")
    name = check_name(name if name is not None else str(meta.get("dataset") or "model"))
    base = models_dir(home)
    if source is not None:
        for v in _versions(base, name):
            existing = _read(base / name / f"v{v}", name, v)
            if existing.source == source:
                return existing
    (base / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base / name))
    try:
        for f in _COPIED:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        (tmp / "registry.json").write_text(json.dumps({"registered_at": time.time(), "source": source,
                                                       "copied_from": str(src.resolve())}, indent=2) + "\n")
        version = (max(_versions(base, name), default=0)) + 1
        while True:
            target = base / name / f"v{version}"
            try:
                os.rename(tmp, target)  # fails if another process filled this version first
                break
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # A name's first version serves it; a later one waits for promotion. Where no record exists yet
    # (a registry from before promotion), the version served until now is recorded.
    pin = max((v for v in _versions(base, name) if v < version), default=version)
    _record_promotion(base / name, pin, by="registration", only_if_none=True)
    return _read(target, name, version)


def list_models(home: str | Path | None = None, all_versions: bool = False) -> list[RegisteredModel]:
    """Registered models by name; the version each name serves, or every version."""
    base = models_dir(home)
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if not d.is_dir() or not NAME_RE.match(d.name):
            continue
        versions = _versions(base, d.name)
        serving = _serving(d, versions)
        for v in (versions if all_versions else [v for v in versions if v == serving]):
            out.append(_read(d / f"v{v}", d.name, v))
    return out


def shipped_models() -> dict[str, Path]:
    """The models that come with cdae-med (package data, ``pipelines/models/NAME``), by name."""
    return {name: path for name, path in SHIPPED.items() if (path / "checkpoint.json").is_file()}


@functools.lru_cache(maxsize=8)
def _content_id(weights: Path, size: int, mtime_ns: int) -> str:
    """The first 12 hex digits of a weights file's SHA-256 (cached per file, size and time)."""
    with open(weights, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:12]


def _source(version_dir: Path) -> str:
    """Where a registered version came from (its ``registry.json``), "" where it does not say."""
    try:
        return str(json.loads((version_dir / "registry.json").read_text()).get("source") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _register_shipped(name: str, home: str | Path | None) -> bool:
    """File the shipped model ``name`` where the registry does not hold it yet: as the first version of
    that name (a fresh install serves it without training), or, where an earlier shipped model of that
    name is registered, as a new version, identified by its weights, so that an upgraded cdae-med does not
    keep serving the model it shipped before (a name that only ever held the user's models is left alone). The new one serves only where a shipped model served until
    now; a model the user promoted keeps serving. Returns whether it registered one."""
    path = shipped_models().get(name)
    if path is None:
        return False
    from cdae_med import __version__

    stat = (path / "weights.pt").stat()
    source = f"{SHIPPED_SOURCE} {__version__} (weights {_content_id(path / 'weights.pt', stat.st_size, stat.st_mtime_ns)})"
    base = models_dir(home)
    versions = _versions(base, name)
    if not versions:
        register(path, name, home=home, source=source)
        return True
    sources = {v: _source(base / name / f"v{v}") for v in versions}  # registry.json only: resolve() runs per job
    shipped_before = [src for src in sources.values() if src.startswith(SHIPPED_SOURCE)]
    if not shipped_before or source in shipped_before:  # the user's own name, or up to date
        return False
    serving = _serving(base / name, versions)
    model = register(path, name, home=home, source=source)
    if sources.get(serving, "").startswith(SHIPPED_SOURCE):
        _record_promotion(base / name, model.version, by=f"cdae-med {__version__} (shipped model updated)")
        log.info("the shipped model %s is new in this version of cdae-med: registered as %s and serving",
                 name, model.ref)
    return True


def resolve(ref: str | None = None, *, home: str | Path | None = None) -> RegisteredModel:
    """``NAME``, ``NAME:vN`` or ``NAME:N``; None = the only registered model (an error if several).
    A shipped model (:func:`shipped_models`) is registered the first time it is asked for, by name or,
    in a registry that holds nothing yet, as None."""
    base = models_dir(home)
    if ref is None and not list_models(home):
        for name in shipped_models():
            _register_shipped(name, home)
    if ref is not None:
        _register_shipped(str(ref).partition(":")[0], home)
    if ref is None:
        models = list_models(home)
        if not models:
            raise RegistryError("no model is registered; train one with `cdae-med train` first")
        if len(models) > 1:
            raise RegistryError(f"several models are registered ({', '.join(m.name for m in models)}); name one")
        return models[0]
    name, _, ver = str(ref).partition(":")
    check_name(name)
    versions = _versions(base, name)
    if not versions:
        known = [m.name for m in list_models(home)]
        raise RegistryError(f"unknown model {name!r}; registered: {', '.join(known) or 'none'}")
    if not ver:
        serving = _serving(base / name, versions)
        if serving not in versions:
            raise RegistryError(f"model {name!r}: its promoted version v{serving} is missing; promote one of "
                                f"{', '.join(f'v{v}' for v in versions)} with `cdae-med models promote {name}:vN`")
        return _read(base / name / f"v{serving}", name, serving)
    m = re.fullmatch(r"v?([1-9][0-9]*)", ver)
    if not m or int(m.group(1)) not in versions:
        raise RegistryError(f"model {name!r} has no version {ver!r}; versions: "
                            f"{', '.join(f'v{v}' for v in versions)}")
    v = int(m.group(1))
    return _read(base / name / f"v{v}", name, v)
