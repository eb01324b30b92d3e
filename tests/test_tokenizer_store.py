"""The dataset's tokenizer: latent stride from the data, held-out split, masks drawn from preprocessed cases, lock."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nnunet_arseg.training.tokenizer_store import (choose_latent_stride, exclusive, median_object_extent,
                                                   split_heldout, widths_name)


def test_latent_stride_follows_object_size_and_caps_the_token_map():
    # LIDC: 128x128 patches, median nodule about 10 px: stride 4 would give a 32x32 latent (1,024 tokens at the
    # finest scale), so the cap of 256 positions makes it 8 (16x16)
    assert choose_latent_stride((128, 128), (10.0, 10.0)) == (8, 8)
    assert choose_latent_stride((128, 128), (10.0, 10.0), max_positions=1024) == (4, 4)
    # large objects: coarse latent; a 512x512 CT patch stays within the cap whatever the objects
    assert choose_latent_stride((128, 128), (60.0, 60.0)) == (32, 32)
    assert choose_latent_stride((512, 512), (10.0, 10.0)) == (32, 32)
    # 3D, anisotropic objects and a patch axis that limits the stride
    stride = choose_latent_stride((48, 160, 128), (6.0, 40.0, 40.0))
    assert all(n % s == 0 for n, s in zip((48, 160, 128), stride))
    assert np.prod([n // s for n, s in zip((48, 160, 128), stride)]) <= 256 and stride[0] < stride[1]


def test_median_object_extent_counts_connected_objects():
    seg = np.zeros((1, 32, 32), dtype=np.int8)
    seg[0, 2:6, 2:4] = 1  # 4 x 2
    seg[0, 10:20, 10:30] = 1  # 10 x 20
    seg[0, 25:28, 25:28] = 2  # another label: 3 x 3
    assert median_object_extent([seg], [1]) == (7.0, 11.0)
    assert median_object_extent([seg], [1, 2]) == (4.0, 3.0)
    assert median_object_extent([seg], [(1, 2)]) == (4.0, 3.0)  # a region
    with pytest.raises(ValueError, match="no foreground"):
        median_object_extent([np.zeros((8, 8))], [1])


def test_heldout_split_is_by_patient_and_seeded():
    cases = [f"c{i:02d}" for i in range(40)]
    patient = {c: f"p{int(c[1:]) // 4}" for c in cases}  # 10 patients of 4 cases
    train, held = split_heldout(cases, patient, fraction=0.2)
    assert len(held) == 8 and set(train) | set(held) == set(cases)
    assert {patient[c] for c in train}.isdisjoint({patient[c] for c in held})
    assert split_heldout(cases, patient, fraction=0.2) == (train, held)
    assert len(split_heldout(cases, None, fraction=0.05)[1]) == 2  # without patients: cases


def test_tokenizer_name_depends_on_widths_only():
    assert widths_name({"ch": 32, "z_channels": 32}) == widths_name({"z_channels": 32, "ch": 32})
    assert widths_name({"ch": 32}) != widths_name({"ch": 16})


def test_lock_is_exclusive_and_a_dead_owner_is_taken_over(tmp_path):
    lock = str(tmp_path / ".lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(lock, "w") as f:
        f.write(dead.stdout.strip())  # a run that was killed while it held the lock
    with exclusive(lock, poll_s=0.01, log=lambda _: None):
        assert int(open(lock).read()) == os.getpid()
    assert not os.path.exists(lock)


def test_a_stored_or_given_tokenizer_is_reused_and_a_new_one_is_sized_from_the_data(tmp_path, monkeypatch):
    import torch

    from nnunet_arseg.tokenizer import MaskTokenizer
    from nnunet_arseg.training.tokenizer_store import load_tokenizer_file, resolve_dataset_tokenizer

    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    widths = {"ch": 8, "num_res_blocks": 1, "z_channels": 8, "codebook_size": 16, "code_dim": 4, "space_to_depth": 2}
    asked = []

    def extent():
        asked.append(1)
        return (10.0, 10.0)

    new = resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (64, 64), widths, extent)
    assert not new.exists() and new.arch_kwargs == {**widths, "latent_stride": [4, 4]} and asked == [1]
    assert "ARSegTokenizer__nnUNetPlans__2d" in new.path
    model = MaskTokenizer(2, (64, 64), **new.arch_kwargs)
    os.makedirs(new.folder)
    torch.save({"arch_kwargs": new.arch_kwargs, "patch_size": [64, 64], "state_dict": model.state_dict()}, new.path)
    # another fold or variant with the same widths: the stored tokenizer, without reading the data again
    again = resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (64, 64), widths, extent)
    assert again.path == new.path and again.exists() and asked == [1]
    # the user's tokenizer, checked against the patch size
    monkeypatch.setenv("nnUNet_ARSEG_TOKENIZER", new.path)
    given = resolve_dataset_tokenizer(str(tmp_path / "other"), "nnUNetPlans", "2d", (64, 64), {"ch": 32}, extent)
    assert given.given and given.path == new.path and given.arch_kwargs == new.arch_kwargs
    with pytest.raises(ValueError, match="patch size"):
        resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (128, 128), widths, extent)
    (tmp_path / "not_a_tokenizer.pth").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "not_a_tokenizer.pth")
    with pytest.raises(ValueError, match="not an AR-Seg tokenizer"):
        load_tokenizer_file(str(tmp_path / "not_a_tokenizer.pth"))
