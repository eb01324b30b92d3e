"""nnU-Net's own trainer lookup finds every AR-Seg trainer through ``nnUNet_extTrainer`` (the shim folder), as the
same class object the package defines, and the classes pickle by their real module path (spawned workers)."""
from __future__ import annotations

import pickle

import pytest
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

import nnunet_arseg.training as training
from nnunet_arseg.nnunet_ext import EXT_DIR


def test_every_trainer_is_found_through_the_shim(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", EXT_DIR)
    for name in training.__all__:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is getattr(training, name)
        assert pickle.loads(pickle.dumps(cls)) is cls


def test_lookup_without_the_set_up_names_the_variable(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_extTrainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainerARSeg_tiny")
