"""Shared fixtures: the LIDC sample shipped in the package, the real data in ``../shared/data`` and a temporary
nnU-Net environment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUNDLED_LIDC = REPO / "nnunet_arseg" / "demo_data" / "lidc"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def shared_data_path(*parts: str) -> Path:
    """Path below ``../shared/data``; skips the test on a user's clone, fails under CI (``CI=true``)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"needs the real data at {path} (../shared/data beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must have the shared data: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session", autouse=True)
def _no_user_nnunet_folders():
    """Tests never see (or write to) the user's own nnU-Net folders; the ``nnunet_env`` fixture sets temporary ones."""
    with pytest.MonkeyPatch.context() as mp:
        for key in NNUNET_FOLDERS:
            mp.delenv(key, raising=False)
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small networks on a shared 2-core machine: one thread is several times faster than threads fighting over busy
    cores. Modules that train or sample in this process use it (``pytestmark``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lidc_demo() -> Path:
    """The 8-patient LIDC demo crops shipped in the package (LIDC-IDRI-slices layout, four raters per slice; the
    same files as ``../shared/data/lidc/demo``), so these tests run on a user's clone too."""
    assert BUNDLED_LIDC.is_dir(), f"the package's LIDC sample is missing: {BUNDLED_LIDC}"
    return BUNDLED_LIDC


@pytest.fixture(scope="session")
def lidc_cimd28() -> Path:
    return shared_data_path("lidc_cimd28")


@pytest.fixture(scope="session")
def brats2015() -> Path:
    return shared_data_path("brats2015_deepmedic6")


@pytest.fixture(scope="session")
def spleen_crop() -> Path:
    return shared_data_path("msd_spleen_crop1")


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> dict[str, str]:
    """``nnUNet_raw``/``_preprocessed``/``_results`` in a temporary folder, with low worker counts."""
    env = {
        "nnUNet_raw": str(tmp_path / "nnUNet_raw"),
        "nnUNet_preprocessed": str(tmp_path / "nnUNet_preprocessed"),
        "nnUNet_results": str(tmp_path / "nnUNet_results"),
        "nnUNet_def_n_proc": "1",
    }
    for key, value in env.items():
        if key in NNUNET_FOLDERS:
            os.makedirs(value, exist_ok=True)
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def brats15_small(brats2015, tmp_path_factory) -> Path:
    """The six real BRATS 2015 cases, same layout and splits, cropped to 48x48x32 (x, y, z) around the tumour."""
    import numpy as np
    import SimpleITK as sitk

    from dataset_conversion.brats import FILES_2015
    crop_xyz = (48, 48, 32)
    root = tmp_path_factory.mktemp("brats15")
    for case_dir in sorted(brats2015.glob("*/brats_*")):
        seg = sitk.ReadImage(str(case_dir / FILES_2015["seg"]))
        zyx = np.argwhere(sitk.GetArrayFromImage(seg) > 0).mean(0).astype(int)
        size = seg.GetSize()
        start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(zyx[::-1], crop_xyz, size)]
        out = root / case_dir.parent.name / case_dir.name
        out.mkdir(parents=True)
        for f in (FILES_2015["flair"], FILES_2015["t1ce"], FILES_2015["seg"]):
            img = sitk.ReadImage(str(case_dir / f))
            sitk.WriteImage(img[tuple(slice(s, s + n) for s, n in zip(start, crop_xyz))], str(out / f))
    return root
