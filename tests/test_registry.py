"""The model registry: versions, promotion (never the newest by itself), idempotent registration by
source, clear errors."""

from __future__ import annotations

import json
import threading

import pytest

from pipelines import registry
from pipelines.registry import RegistryError, list_models, promote, promoted_version, register, resolve


def fake_checkpoint(path, dataset="brain"):
    path.mkdir(parents=True)
    graph = {"name": dataset, "variables": [{"name": "age", "unit": "years", "centre": 60.0, "scale": 20.0,
                                             "range": [20.0, 95.0], "parents": []}]}
    (path / "checkpoint.json").write_text(json.dumps({"format_version": 1, "dataset": dataset, "graph": graph,
                                                      "image": {"size": [16, 16, 16]}}))
    (path / "weights.pt").write_bytes(b"w")
    (path / "training.pt").write_bytes(b"optimizer state")
    return path


def test_versions_serve_only_once_promoted(tmp_path):
    home = tmp_path / "home"
    ck = fake_checkpoint(tmp_path / "ck")
    a = register(ck, home=home)
    b = register(ck, "brain", home=home)
    assert (a.ref, b.ref) == ("brain:v1", "brain:v2")
    assert a.promoted and not b.promoted  # the first version serves a fresh name; a newer one waits
    assert not (b.path / "training.pt").exists() and (b.path / "weights.pt").is_file()
    assert resolve("brain", home=home).version == 1 == promoted_version("brain", home=home)
    assert resolve("brain:v2", home=home).version == 2 and resolve("brain:2", home=home).version == 2
    assert [m.ref for m in list_models(home)] == ["brain:v1"]
    assert [(m.ref, m.promoted) for m in list_models(home, all_versions=True)] == [("brain:v1", True),
                                                                                  ("brain:v2", False)]
    assert resolve(home=home).ref == "brain:v1"  # the only model
    assert resolve("brain", home=home).graph.names == ("age",)
    assert promote("brain:v2", home=home, by="test").promoted
    assert resolve("brain", home=home).version == 2 and [m.ref for m in list_models(home)] == ["brain:v2"]
    assert register(ck, "brain", home=home).ref == "brain:v3" and resolve("brain", home=home).version == 2
    promote("brain:v1", home=home)  # back to an older one
    assert resolve("brain", home=home).version == 1
    with pytest.raises(RegistryError, match="name the version"):
        promote("brain", home=home)
    with pytest.raises(RegistryError, match="no version 'v9'"):
        promote("brain:v9", home=home)


def test_a_registry_from_before_promotion_keeps_serving_its_newest(tmp_path):
    home = tmp_path / "home"
    ck = fake_checkpoint(tmp_path / "ck")
    register(ck, "brain", home=home)
    register(ck, "brain", home=home)
    (home / "models" / "brain" / "promoted.json").unlink()  # as an earlier version left it
    assert resolve("brain", home=home).version == 2  # what it served before
    assert register(ck, "brain", home=home).ref == "brain:v3"
    assert resolve("brain", home=home).version == 2  # recorded at that registration; v3 waits


def test_same_source_registers_once(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    first = register(ck, "m", home=tmp_path, source="job-1")
    again = register(ck, "m", home=tmp_path, source="job-1")
    assert first.ref == again.ref == "m:v1"
    assert register(ck, "m", home=tmp_path, source="job-2").ref == "m:v2"


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    refs = []
    threads = [threading.Thread(target=lambda: refs.append(register(ck, "m", home=tmp_path).ref)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(refs) == [f"m:v{i}" for i in range(1, 7)]


def test_errors_are_clear(tmp_path, monkeypatch):
    ck = fake_checkpoint(tmp_path / "ck")
    monkeypatch.setattr(registry, "SHIPPED", {})  # a build without shipped models
    with pytest.raises(RegistryError, match="no model is registered"):
        resolve(home=tmp_path)
    register(ck, "a", home=tmp_path)
    register(ck, "b", home=tmp_path)
    with pytest.raises(RegistryError, match="several models"):
        resolve(home=tmp_path)
    with pytest.raises(RegistryError, match="unknown model 'c'; registered: a, b"):
        resolve("c", home=tmp_path)
    with pytest.raises(RegistryError, match="no version 'v7'"):
        resolve("a:v7", home=tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(RegistryError, match="model name"):
            register(ck, bad, home=tmp_path)
    with pytest.raises(RegistryError, match="not a checkpoint"):
        register(tmp_path / "nothing", home=tmp_path)


def test_default_home_is_cdae_home(tmp_path, monkeypatch):
    from pipelines.registry import default_home

    monkeypatch.setenv("CDAE_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    ck = fake_checkpoint(tmp_path / "ck")
    assert register(ck).path == tmp_path / "h" / "models" / "brain" / "v1"


def test_cli_train_registers_and_models_list_shows_it(tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from cdae_cli import app
    from synthetic_data.brain import write_dataset

    monkeypatch.setenv("CDAE_HOME", str(tmp_path / "home"))
    write_dataset(tmp_path / "cohort", n=2, size=16, seed=0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["train", "--dataset", "brain", "--data", str(tmp_path / "cohort"), "--size", "16",
                                       "--steps", "1", "--batch-size", "2", "--eval-n", "0", "--out",
                                       str(tmp_path / "ck"), "--quiet", "--device", "cpu", "--register-as", "mri"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "registered as mri:v1" in res.output
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and listed.output.startswith("mri:v1\tbrain\tage, sex, brain_volume, ventricle_volume")
    bad = CliRunner().invoke(app, ["train", "--dataset", "brain", "--register-as", "../x", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "model name" in bad.output


def test_an_upgrade_that_ships_other_weights_serves_them_unless_the_user_promoted_a_model(tmp_path, monkeypatch):
    home = tmp_path / "home"
    shipped = fake_checkpoint(tmp_path / "shipped")
    monkeypatch.setattr(registry, "SHIPPED", {"brain": shipped})
    first = resolve("brain", home=home)
    assert first.ref == "brain:v1" and first.source.startswith("shipped with cdae-med")
    assert resolve("brain", home=home).ref == "brain:v1"  # asked again: nothing new registered
    assert [m.ref for m in list_models(home, all_versions=True)] == ["brain:v1"]

    (shipped / "weights.pt").write_bytes(b"retrained")  # a later cdae-med ships another brain model
    second = resolve("brain", home=home)
    assert second.ref == "brain:v2" and second.promoted and second.source != first.source
    assert (second.path / "weights.pt").read_bytes() == b"retrained"

    own = register(fake_checkpoint(tmp_path / "own"), "brain", home=home)  # the user's own model, promoted
    promote(own.ref, home=home, by="user")
    (shipped / "weights.pt").write_bytes(b"retrained again")
    assert resolve("brain", home=home).ref == own.ref  # theirs keeps serving ...
    versions = list_models(home, all_versions=True)
    assert [m.ref for m in versions] == ["brain:v1", "brain:v2", "brain:v3", "brain:v4"]  # ... the new one waits
    assert (versions[-1].path / "weights.pt").read_bytes() == b"retrained again" and not versions[-1].promoted
