"""Scans bounded before they are inflated or resampled (issue 15), in cdae_med.io and in a
worker's ScanModel: the header alone refuses a hostile file (voxels, bytes, field of view, header
size, dimensions), the streamed check refuses what the header hides (data past it, NaN,
truncation) holding about a megabyte, and the limits are parameters a worker passes on. The
service's side (the API, a worker process) is tests/test_service_limits.py."""

from __future__ import annotations

import tracemalloc

import pytest

from cdae_med.io import NiftiError, ScanLimits, check_nifti_file, read_header, read_nifti
from tests.hostile_scans import head_scan, write_hostile
from tests.service_support import ROOT

TINY = ROOT / "tests" / "assets" / "brain16-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name,message", [
    ("bomb_512_float64", "1,024 MiB of data"), ("bomb_extension", "data start at byte"),
    ("voxels_200mm", "field of view of 6,400 x 6,400 x 6,400 mm"), ("voxels_1000mm", "field of view"),
    ("huge_dimensions", "dimensions (2000, 2000, 2000)")])
def test_the_header_alone_refuses_a_hostile_file(files, name, message):
    for check in (read_header, read_nifti, check_nifti_file):
        with pytest.raises(NiftiError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            check(files[name])
        assert files[name].name in str(info.value) and "\n" not in str(info.value)


def test_limits_are_parameters(files, tmp_path):
    head = head_scan(tmp_path / "head.nii.gz", size=64, spacing=4.0)  # 256 mm, 1 MiB
    assert read_header(head).fov_mm == (256.0, 256.0, 256.0)
    with pytest.raises(NiftiError, match="at most 200 mm"):
        read_nifti(head, ScanLimits(max_fov_mm=200))
    with pytest.raises(NiftiError, match="at most 0 MiB"):
        check_nifti_file(head, ScanLimits(max_bytes=1000))
    assert read_nifti(files["voxels_200mm"], ScanLimits(max_fov_mm=10_000)).data.shape == (32, 32, 32)


def test_the_stream_check_refuses_what_the_header_hides(files, tmp_path):
    with pytest.raises(NiftiError, match="more data than its header describes"):
        check_nifti_file(files["bomb_trailing"])
    with pytest.raises(NiftiError, match="1 voxels are NaN or infinite"):
        check_nifti_file(files["nan_256"])
    raw = files["nan_256"].read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(NiftiError, match="truncated"):
        check_nifti_file(tmp_path / "cut.nii.gz")


def test_the_stream_check_holds_about_a_megabyte(tmp_path):
    """A 64 MiB volume (256^3 float32, 1 mm) is checked in full with a few MiB of Python memory."""
    head = head_scan(tmp_path / "head.nii.gz", size=256, spacing=1.0)
    tracemalloc.start()
    try:
        check_nifti_file(head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_worker_refuses_a_huge_field_of_view_before_resampling(files):
    from pipelines.scans import ScanError, ScanModel

    model = ScanModel.load(TINY, device="cpu", num_steps=2)
    assert model.limits == ScanLimits()
    with pytest.raises(ScanError, match="field of view of 32,000"):
        model.prepare(files["voxels_1000mm"])
    strict = ScanModel.load(TINY, device="cpu", num_steps=2, limits=ScanLimits(max_fov_mm=100))
    small = head_scan(files["voxels_1000mm"].parent / "small.nii.gz", size=32, spacing=6.0)  # 192 mm
    assert model.prepare(small).image.shape[1:] == (16, 16, 16)
    with pytest.raises(ScanError, match="at most 100 mm"):
        strict.prepare(small)
