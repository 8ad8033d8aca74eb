"""The ``cdae-med`` command: the top layer, above :mod:`service`, :mod:`pipelines`,
:mod:`synthetic_data` and :mod:`cdae_med` (see the import-linter contracts in pyproject.toml)."""

from .main import app

__all__ = ["app"]
