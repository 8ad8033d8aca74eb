"""The layers of DESIGN.md hold: imports point down (command line > service > pipelines >
synthetic_data > cdae_med), and the API process never imports the Celery task module. The
contracts are written in pyproject.toml ([tool.importlinter]) and checked with import-linter."""

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0
