"""The model registry: versions, newest wins, idempotent registration by source, clear errors."""

from __future__ import annotations

import json
import threading

import pytest

from pipelines.registry import RegistryError, list_models, register, resolve


def fake_checkpoint(path, dataset="brain"):
    path.mkdir(parents=True)
    graph = {"name": dataset, "variables": [{"name": "age", "unit": "years", "centre": 60.0, "scale": 20.0,
                                             "range": [20.0, 95.0], "parents": []}]}
    (path / "checkpoint.json").write_text(json.dumps({"format_version": 1, "dataset": dataset, "graph": graph,
                                                      "image": {"size": [16, 16, 16]}}))
    (path / "weights.pt").write_bytes(b"w")
    (path / "training.pt").write_bytes(b"optimizer state")
    return path


def test_versions_newest_wins(tmp_path):
    home = tmp_path / "home"
    ck = fake_checkpoint(tmp_path / "ck")
    a = register(ck, home=home)
    b = register(ck, "brain", home=home)
    assert (a.ref, b.ref) == ("brain:v1", "brain:v2")
    assert not (b.path / "training.pt").exists() and (b.path / "weights.pt").is_file()
    assert resolve("brain", home=home).version == 2
    assert resolve("brain:v1", home=home).version == 1 and resolve("brain:1", home=home).version == 1
    assert [m.ref for m in list_models(home)] == ["brain:v2"]
    assert [m.ref for m in list_models(home, all_versions=True)] == ["brain:v1", "brain:v2"]
    assert resolve(home=home).ref == "brain:v2"  # the only model
    assert resolve("brain", home=home).graph.names == ("age",)


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


def test_errors_are_clear(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
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
