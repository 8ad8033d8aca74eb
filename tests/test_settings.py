"""The CDAE_* settings: typed fields, derived values, errors naming the variable, and the README's
list of them."""

import os
import re
from pathlib import Path

import pytest

from pipelines.settings import RuntimeSettings, SettingsError
from service.config import Settings, embedded_broker_url, get_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """An environment with no CDAE_ variable but CDAE_HOME."""
    for name in list(os.environ):
        if name.startswith("CDAE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CDAE_HOME", str(tmp_path / "home"))
    return monkeypatch


def readme_settings() -> list[str]:
    """The variables in the README's "Settings" table, in order."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^### Settings\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "README.md has no '### Settings' section"
    return re.findall(r"^\| `(CDAE_\w+)` \|", section.group(1), re.M)


def test_readme_lists_every_setting_once():
    documented = readme_settings()
    declared = [Settings.env_name(f) for f in Settings.model_fields]
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    assert set(documented) == set(declared), {"undocumented": set(declared) - set(documented),
                                              "not a setting": set(documented) - set(declared)}


def test_defaults_and_derived_values(env, tmp_path):
    s = get_settings()
    home = tmp_path / "home"
    assert s.home == home and s.device == "auto" and s.torch_threads is None
    assert s.broker_embedded and s.broker_url == embedded_broker_url(home)
    assert s.database_url == f"sqlite:///{home / 'service.db'}"
    assert s.max_upload_bytes == 512 * 1024 * 1024 and s.max_voxels == 512**3
    assert (s.stale_s, s.heartbeat_s, s.sweep_s, s.max_attempts, s.ddim_steps, s.model_cache) == (120, 10, 30, 3, 50, 2)
    assert s.job_dir("abc") == home / "jobs" / "abc" and s.jobs_dir == home / "jobs"
    env.setenv("CDAE_BROKER_URL", "redis://127.0.0.1:6379/0")
    env.setenv("CDAE_MAX_UPLOAD_MB", "1.5")
    env.setenv("CDAE_TORCH_THREADS", "1")
    env.setenv("CDAE_DEVICE", "cuda:1")
    env.setenv("CDAE_BROKER_PREFIX", "")  # empty is unset
    s = get_settings()  # read afresh
    assert not s.broker_embedded and s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.max_upload_bytes == int(1.5 * 1024 * 1024) and s.torch_threads == 1 and s.device == "cuda:1"
    assert s.broker_prefix == ""


def test_home_is_expanded_and_shared_with_the_pipelines(env):
    from pipelines.registry import default_home
    from pipelines.regressors import cdae_home

    env.setenv("CDAE_HOME", "~/somewhere")
    assert RuntimeSettings().home == Path.home() / "somewhere" == default_home() == cdae_home()
    env.delenv("CDAE_HOME")
    assert default_home() == Path.home() / ".cdae-med"


@pytest.mark.parametrize("name,value,says", [
    ("CDAE_MAX_UPLOAD_MB", "lots", "number"),
    ("CDAE_MAX_UPLOAD_MB", "0", "greater than 0"),
    ("CDAE_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
    ("CDAE_STALE_S", "soon", "number"),
    ("CDAE_DEVICE", "gpu", "auto, cpu or cuda"),
    ("CDAE_TORCH_THREADS", "two", "integer"),
    ("CDAE_MODEL_CACHE", "-1", "greater than or equal to 1"),
])
def test_a_bad_value_names_the_variable(env, name, value, says):
    env.setenv(name, value)
    with pytest.raises(SettingsError, match=f"^{name}='{re.escape(value)}': .*{says}"):
        get_settings()
    if name == "CDAE_DEVICE":  # a runtime setting: the pipelines layer refuses it too
        with pytest.raises(ValueError, match=name):
            RuntimeSettings()


def test_the_module_docstring_lists_the_settings():
    import service.config

    for field in Settings.model_fields:
        assert Settings.env_name(field) in service.config.__doc__
