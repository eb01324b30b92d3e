"""What installing into a lab's environment does: the trainer folder is added to ``nnUNet_extTrainer`` (never
replacing it), and ``make`` does not force its pinned versions into an active environment it did not create."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_arseg.nnunet_ext import EXT_DIR

REPO = Path(__file__).resolve().parents[1]


def test_ext_dir_keeps_the_trainer_folders_a_lab_already_has(tmp_path):
    command = str(Path(sys.executable).with_name("nnUNetv2_arseg_ext_dir"))
    lab = os.pathsep.join([str(tmp_path / "lab_trainers"), str(tmp_path / "more")])
    env = {**os.environ, "nnUNet_extTrainer": lab}
    out = subprocess.run([command], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == [str(tmp_path / "lab_trainers"), str(tmp_path / "more"), EXT_DIR]
    again = subprocess.run([command], env={**env, "nnUNet_extTrainer": out}, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert again == out  # exporting it twice (e.g. from ~/.bashrc) adds nothing
    env.pop("nnUNet_extTrainer")
    assert subprocess.run([command], env=env, capture_output=True, text=True, check=True).stdout.strip() == EXT_DIR


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_refuses_to_pin_versions_into_an_active_environment_it_did_not_create(tmp_path):
    lab_env = tmp_path / "lab_env"
    (lab_env / "bin").mkdir(parents=True)
    env = {**os.environ, "VIRTUAL_ENV": str(lab_env)}
    run = subprocess.run(["make", "-C", str(REPO), "install"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert str(lab_env) in run.stderr and "torch==" in run.stderr and "USE_ACTIVE_VENV=1" in run.stderr
    assert sorted(p.name for p in lab_env.iterdir()) == ["bin"]  # nothing installed or written there
