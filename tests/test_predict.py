"""``nnUNetv2_arseg_predict`` on real models (``lidc_model.py``: planned by nnU-Net on real LIDC crops of the bundled
sample, overfit on their four raters): the written samples, consensus and uncertainty agree with each other and with
the stock ``nnUNetv2_predict`` (2D and a multi-tile 3D case, with and without mirroring), ``--continue_prediction``
redoes exactly the incomplete cases, a folder holds one run (another is refused or replaced whole), parts of one run
share a folder, and bad inputs are refused before anything is written."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lidc_model
import nnunet_arseg
from nnunet_arseg.inference import predict
from nnunet_arseg.prediction_files import (ARGS_FILE, ExtraOutputs, case_record_file, sample_file, scales_file,
                                           settings_changes, uncertainty_files)
from nnunet_arseg.nnunet_ext import EXT_DIR

PY = sys.executable
BIN = Path(PY).parent
N = 8


@pytest.fixture(scope="module")
def lidc2d(tmp_path_factory):
    return lidc_model.lidc_2d_model(tmp_path_factory.mktemp("lidc2d"))


@pytest.fixture(scope="module")
def lidc3d(tmp_path_factory):
    return lidc_model.lidc_3d_model(tmp_path_factory.mktemp("lidc3d"))


def _env(model: dict, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_ARSEG_")}
    return {**env, **model["paths"], "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": EXT_DIR, **extra}


def _run(cmd: list[str], env: dict) -> str:
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _ours(model: dict, out: Path, *flags, device: str | None = "cpu") -> list:
    return [PY, "-m", "nnunet_arseg.inference.predict", "-i", model["images"], "-o", out, "-d", model["dataset_id"],
            "-c", "2d", "-f", "0", *(["-device", device] if device else []), "--disable_progress_bar", *flags]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".json")}


@pytest.mark.e2e
def test_outputs_agree_with_the_samples_and_the_stock_command(lidc2d, tmp_path):
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    _run(_ours(lidc2d, ours, "-npp", "0", "-nps", "0", "--disable_tta", "--num_samples", N, "--seed", 3,
               "--save_samples", "--save_uncertainty", "--save_scales"), _env(lidc2d))
    _run([BIN / "nnUNetv2_predict", "-i", lidc2d["images"], "-o", stock, "-d", lidc2d["dataset_id"], "-c", "2d",
          "-f", "0", "-tr", lidc_model.TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
          "--disable_progress_bar"], _env(lidc2d, nnUNet_ARSEG_NUM_SAMPLES=str(N), nnUNet_ARSEG_SEED="3"))
    cases = lidc2d["cases"]
    assert sorted(p.name for p in ours.glob("*.png")) == sorted(f"{c}.png" for c in cases)
    disagreeing = marking = 0
    for case in cases:
        assert filecmp.cmp(ours / f"{case}.png", stock / f"{case}.png", shallow=False)  # the same consensus
        samples = np.stack([_png(sample_file(str(ours), case, k, ".png")) for k in range(N)])
        consensus = _png(ours / f"{case}.png")
        assert set(np.unique(samples)) <= {0, 1}
        marking += int((samples.reshape(N, -1).sum(1) > 0).sum())
        # single tile, no resampling, no mirroring: the consensus is the strict majority of the written samples
        np.testing.assert_array_equal(consensus, (2 * samples.sum(0) > N).astype(consensus.dtype))
        npz, png = uncertainty_files(str(ours), case)
        unc = np.load(npz)["uncertainty"].reshape(consensus.shape)
        disagree = ~(samples == samples[0]).all(0)
        assert np.all(unc[~disagree] == 0) and np.all(unc[disagree] > 0)
        disagreeing += int(disagree.sum())
        assert Path(png).is_file() and Path(scales_file(str(ours), case)).is_file()
    # the checks above cannot pass vacuously: the model draws masks (it was overfit on them), and they disagree
    assert marking >= N * len(cases) // 2, f"only {marking} of {N * len(cases)} samples mark anything"
    assert disagreeing > 0, "the samples never disagree: the checks above would hold for a deterministic model too"
    args = json.loads((ours / ARGS_FILE).read_text())
    assert args["num_samples"] == N and args["seed"] == 3 and args["mirroring"] == [] and args["save_samples"]


@pytest.mark.e2e
def test_temperature_trades_diversity_for_the_most_likely_mask(lidc2d, tmp_path):
    """``--temperature``: near 0 every drawn mask of a case is the same (the per-scale argmax), at 1 they are not; the
    stock command takes it from ``nnUNet_ARSEG_TEMPERATURE``."""
    def masks(temperature: str, out: Path) -> list[np.ndarray]:
        _run(_ours(lidc2d, out, "-npp", "0", "-nps", "0", "--disable_tta", "--num_samples", N, "--save_samples",
                   "--temperature", temperature), _env(lidc2d))
        assert json.loads((out / ARGS_FILE).read_text())["temperature"] == float(temperature)
        return [np.stack([_png(sample_file(str(out), case, k, ".png")) for k in range(N)]) for case in lidc2d["cases"]]

    def distinct_drawn(samples: np.ndarray) -> int:
        return len({s.tobytes() for s in samples if s.any()})

    cold, warm = masks("1e-4", tmp_path / "cold"), masks("1", tmp_path / "warm")
    assert sum(distinct_drawn(s) for s in cold) == len(cold)  # one mask per case (absent samples aside)
    assert any(distinct_drawn(s) > 1 for s in warm)
    stock = tmp_path / "stock"
    _run([BIN / "nnUNetv2_predict", "-i", lidc2d["images"], "-o", stock, "-d", lidc2d["dataset_id"], "-c", "2d",
          "-f", "0", "-tr", lidc_model.TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
          "--disable_progress_bar"], _env(lidc2d, nnUNet_ARSEG_NUM_SAMPLES=str(N), nnUNet_ARSEG_TEMPERATURE="1e-4"))
    for case in lidc2d["cases"]:
        assert filecmp.cmp(tmp_path / "cold" / f"{case}.png", stock / f"{case}.png", shallow=False)


@pytest.mark.e2e
def test_anchor_samples_around_given_masks(lidc2d, tmp_path):
    """``--anchor FOLDER``: every drawn mask of a case is the anchor itself (not its tokenized reconstruction) where
    all scales come from it (the stock command given the folder as ``-prev_stage_predictions`` agrees), and only the
    coarse ones with ``--anchor_scales``."""
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    for case in lidc2d["cases"]:  # a rater who marked the nodule
        raters = lidc2d["raters"][case]
        Image.fromarray(raters[raters.reshape(4, -1).any(1)][0].astype(np.uint8)).save(anchors / f"{case}.png")

    def drawn(out: Path, *flags) -> list[np.ndarray]:
        _run(_ours(lidc2d, out, "-npp", "0", "-nps", "0", "--disable_tta", "--num_samples", N, "--save_samples",
                   "--anchor", anchors, *flags), _env(lidc2d))
        return [np.stack([s for k in range(N) if (s := _png(sample_file(str(out), case, k, ".png"))).any()])
                for case in lidc2d["cases"]]

    for case, samples in zip(lidc2d["cases"], drawn(tmp_path / "all")):
        anchor = _png(anchors / f"{case}.png") > 0
        np.testing.assert_array_equal(samples, np.broadcast_to(anchor, samples.shape), err_msg=case)
    args = json.loads((tmp_path / "all" / ARGS_FILE).read_text())
    assert args["anchor"] == str(anchors) and args["anchor_scales"] > 2  # all of the tokenizer's scales
    assert args["sampler"] == "anchored"  # what --anchor samples with
    stock = tmp_path / "stock"  # nnU-Net's own previous-stage input is the same anchor
    _run([BIN / "nnUNetv2_predict", "-i", lidc2d["images"], "-o", stock, "-d", lidc2d["dataset_id"], "-c", "2d",
          "-f", "0", "-tr", lidc_model.TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
          "--disable_progress_bar", "-prev_stage_predictions", anchors], _env(lidc2d, nnUNet_ARSEG_NUM_SAMPLES=str(N)))
    for case in lidc2d["cases"]:
        assert filecmp.cmp(tmp_path / "all" / f"{case}.png", stock / f"{case}.png", shallow=False)
    coarse = drawn(tmp_path / "coarse", "--anchor_scales", "2")
    assert json.loads((tmp_path / "coarse" / ARGS_FILE).read_text())["anchor_scales"] == 2
    assert any(len({s.tobytes() for s in samples}) > 1 for samples in coarse)  # the finer scales are drawn


@pytest.mark.e2e
def test_continue_prediction_redoes_exactly_the_incomplete_cases(lidc2d, tmp_path):
    out, first = tmp_path / "out", tmp_path / "first"
    flags = ["--num_samples", 4, "--save_samples", "--save_uncertainty"]
    # nnU-Net's worker processes, and nnUNet_extTrainer pointing at the package folder itself
    _run(_ours(lidc2d, out, "-npp", "1", "-nps", "1", *flags),
         _env(lidc2d, nnUNet_extTrainer=os.path.dirname(nnunet_arseg.__file__)))
    shutil.copytree(out, first)
    a, b, c, d = lidc2d["cases"]
    os.remove(sample_file(str(out), a, 2, ".png"))
    os.remove(out / f"{b}.png")
    os.remove(uncertainty_files(str(out), c)[0])
    (out / "samples" / f".tmp-0123abcd-{c}_sample00.png").write_bytes(b"half a file")  # a kill during a write
    untouched = {p: p.stat().st_mtime_ns for p in out.rglob(f"{d}*")}
    log = _run(_ours(lidc2d, out, "-npp", "0", "-nps", "0", "--continue_prediction", *flags), _env(lidc2d))
    assert "1 of 4 cases have every requested output; predicting the other 3" in log
    assert _tree(out) == _tree(first)  # the redone cases are byte-identical to the first run's
    assert {p: p.stat().st_mtime_ns for p in out.rglob(f"{d}*")} == untouched
    res = subprocess.run([str(x) for x in _ours(lidc2d, out, "-npp", "0", "-nps", "0", "--continue_prediction",
                                                "--seed", "1", *flags)], env=_env(lidc2d), capture_output=True,
                         text=True)
    assert res.returncode != 0 and "seed: 0 -> 1" in res.stderr and "another folder" in res.stderr
    assert "--replace_outputs" in res.stderr and _tree(out) == _tree(first)

    # another run replaces the first whole, part by part (part k: cases k and k + 2), never a user's file
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "README").write_text("mine")
    other = ["-npp", "0", "-nps", "0", "--seed", "1", "--num_samples", 2, "--save_samples", "-num_parts", 2]
    log = _run(_ours(lidc2d, out, *other, "-part_id", 0, "--replace_outputs"), _env(lidc2d))
    assert "removed the files of 2 case(s) predicted with other settings (" in log
    assert "num_samples: 4 -> 2" in log and "seed: 0 -> 1" in log
    # the other part's cases still hold the first run's files: continuing there is refused by their own records
    res = subprocess.run([str(x) for x in _ours(lidc2d, out, *other, "-part_id", 1, "--continue_prediction")],
                         env=_env(lidc2d), capture_output=True, text=True)
    assert res.returncode != 0 and f"case(s) {b}, {d} were predicted with other settings (" in res.stderr
    assert "seed: 0 -> 1" in res.stderr and "--replace_outputs" in res.stderr
    _run(_ours(lidc2d, out, *other, "-part_id", 1, "--continue_prediction", "--replace_outputs"), _env(lidc2d))
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        ["README"] + [f"{case}_sample{k:02d}.png" for case in (a, b, c, d) for k in range(2)])
    assert not list((out / "uncertainty").iterdir()) and (out / "notes.txt").read_text() == "mine"
    assert {json.loads(Path(case_record_file(str(out), case)).read_text())["seed"] for case in (a, b, c, d)} == {1}


def test_output_folder_rules(tmp_path):
    """Which cases of ``-o`` a call may replace: its own part's and those in no part of the input (never another
    part's, never a file outside the layout); a folder of an earlier version (a run record, no case records) is
    judged by its run record; a case without a record beside recorded ones is never removed."""
    out = tmp_path / "out"
    for name in ("a.png", "samples/a_sample00.png", "samples/a_sample07.png", "b.png", "c.png", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    run = {"model_folder": "M", "folds": [0], "num_samples": 4, "seed": 0}
    (out / ARGS_FILE).write_text(json.dumps({**run, "seed": 1}))
    with pytest.raises(predict.InputError, match=r"case\(s\) a, c were predicted with other settings \(seed: 1 -> 0\)"):
        predict.prepare_output_folder(str(out), run, ["a"], ["a", "b"], ".png", replace=False)
    predict.prepare_output_folder(str(out), run, ["a"], ["a", "b"], ".png", replace=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [ARGS_FILE, "b.png", "notes.txt"]
    Path(case_record_file(str(out), "a")).parent.mkdir()
    Path(case_record_file(str(out), "a")).write_text(json.dumps(run))
    (out / "a.png").write_bytes(b"x")
    with pytest.raises(predict.InputError, match=r"case\(s\) b that nnUNetv2_arseg_predict has no record of writing"):
        predict.prepare_output_folder(str(out), run, ["b"], ["a", "b"], ".png", replace=True)
    assert (out / "b.png").is_file() and (out / "a.png").is_file()


def test_a_record_from_before_the_samplers_is_another_run():
    """A record of 0.2 / 0.3-dev has no sampler: it drew with that version's default, so it differs from any run with
    a named sampler; other keys an older record lacks are not compared."""
    now = {"seed": 0, "num_samples": 4, "sampler": "autoregressive"}
    assert settings_changes({"seed": 0}, now) == ["sampler: None -> autoregressive"]
    assert settings_changes({"seed": 0, "sampler": "autoregressive"}, now) == []
    assert settings_changes({"seed": 1, "sampler": "head"}, now) == ["seed: 1 -> 0", "sampler: head -> autoregressive"]


@pytest.mark.e2e
def test_parts_share_one_folder(lidc2d, tmp_path):
    """Two parts (``-part_id``/``-num_parts``) into one ``-o`` at once: each removes only the temporaries a killed run
    left of its own cases, and together they write the same files as one run. Without ``-device``, on a machine
    without CUDA (none visible here), each says so in one line and predicts on the CPU; ``-device cuda`` is refused
    before anything starts."""
    flags = ["--num_samples", 3, "--save_samples", "--save_uncertainty"]
    one, parts = tmp_path / "one", tmp_path / "parts"
    _run(_ours(lidc2d, one, "-npp", "0", "-nps", "0", *flags), _env(lidc2d))
    cases = lidc2d["cases"]
    (parts / "samples").mkdir(parents=True)
    for case in cases[:2]:  # one of part 0's cases, one of part 1's
        (parts / "samples" / f".tmp-0123abcd-{case}_sample00.png").write_bytes(b"half a file")
    no_cuda = _env(lidc2d, CUDA_VISIBLE_DEVICES="")
    # part 0 in nnU-Net's worker processes (nnU-Net splits the cases), part 1 in its own process
    procs = [subprocess.Popen([str(x) for x in _ours(lidc2d, parts, *flags, "-part_id", k, "-num_parts", 2,
                                                     "-npp", processes, "-nps", processes, device=None)],
                              env=no_cuda, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, processes in ((0, 1), (1, 0))]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
        assert "removed 1 temporary file(s)" in log and "Traceback" not in log
        assert log.count("no CUDA device found, predicting on the CPU") == 1
    assert _tree(parts) == _tree(one) and not list(parts.rglob(".tmp-*"))
    assert ({p.name: p.read_text() for p in (parts / "arseg_cases").iterdir()} ==
            {p.name: p.read_text() for p in (one / "arseg_cases").iterdir()})
    res = subprocess.run([str(x) for x in _ours(lidc2d, tmp_path / "never", device="cuda")], env=no_cuda,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "-device cuda: torch finds no CUDA device" in res.stderr
    assert "-device cpu" in res.stderr and "Traceback" not in res.stderr and not (tmp_path / "never").exists()


@pytest.mark.parametrize("which,mirroring", [("2d", True), ("3d", False), ("3d", True)])
def test_same_consensus_as_the_stock_predictor(which, mirroring, lidc2d, lidc3d, tmp_path, monkeypatch):
    """nnU-Net's own predictor class (what nnUNetv2_predict runs) and ours, in this process, on the same model."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_arseg.inference.predictor import ARSegPredictor
    model = lidc2d if which == "2d" else lidc3d
    for k, v in _env(model, nnUNet_ARSEG_NUM_SAMPLES="3", nnUNet_ARSEG_SEED="4").items():
        monkeypatch.setenv(k, v)
    outs = []
    for cls, kw in ((nnUNetPredictor, {}), (ARSegPredictor, {"num_samples": 3, "seed": 4,
                                                             "extras": ExtraOutputs(samples=True)})):
        p = cls(use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False, **kw)
        p.initialize_from_trained_model_folder(str(model["model"]), (0,))
        assert (p.allowed_mirroring_axes is not None) and len(p.allowed_mirroring_axes) == (2 if which == "2d" else 3)
        out = tmp_path / cls.__name__
        out.mkdir()
        p.predict_from_files_sequential(str(model["images"]), str(out))
        outs.append(out)
    ext = ".png" if which == "2d" else ".nii.gz"
    for f in sorted(outs[0].glob(f"*{ext}")):
        stock = _png(f) if which == "2d" else SimpleITKIO().read_seg(str(f))[0]
        ours = _png(outs[1] / f.name) if which == "2d" else SimpleITKIO().read_seg(str(outs[1] / f.name))[0]
        np.testing.assert_array_equal(stock, ours)
        assert stock.any() and not stock.all()
        assert len(list((outs[1] / "samples").glob(f"{f.name[:-len(ext)]}_sample*{ext}"))) == 3
    if which == "3d":
        shape, patch = model["shape"], [16, 32, 32]
        assert any(s > p for s, p in zip(shape, patch)), "the 3D case must need several tiles"


# ---------------------------------------------------------------- refused before nnU-Net starts
def _refused(capsys, model, tmp_path, *flags, inputs=None) -> str:
    out = tmp_path / "never"
    argv = ["-i", str(inputs or model["images"]), "-o", str(out), "-d", str(model["dataset_id"]), "-c", "2d", "-f",
            "0", "-device", "cpu", *map(str, flags)]
    with pytest.raises(SystemExit) as e:
        predict.main(argv)
    err = capsys.readouterr().err + str(e.value.code)
    assert e.value.code not in (0, None) and not out.exists(), err
    return err


@pytest.fixture
def paths(lidc2d, monkeypatch):
    for k, v in lidc2d["paths"].items():
        monkeypatch.setenv(k, v)
    return lidc2d


def test_bad_model_flags_are_refused(paths, tmp_path, capsys):
    err = _refused(capsys, {**paths, "dataset_id": 777}, tmp_path)
    assert "-d 777: unknown dataset" in err and "nnUNet_results=" in err and "Traceback" not in err
    err = _refused(capsys, paths, tmp_path, "-chk", "checkpoint_best.pth")
    assert "no checkpoint_best.pth for fold(s) 0" in err and "-chk" in err
    err = _refused(capsys, paths, tmp_path, "-f", "0", "1")
    assert "fold(s) 1" in err and "-f 0" in err
    err = _refused(capsys, paths, tmp_path, "-tr", "nnUNetTrainer")
    assert "no trained model" in err and "nnUNetTrainerARSeg__nnUNetPlans__2d" in err
    err = _refused(capsys, paths, tmp_path, "--num_samples", "0")
    assert "--num_samples must be >= 1" in err
    err = _refused(capsys, paths, tmp_path, "--temperature", "0")
    assert "--temperature must be > 0" in err
    err = _refused(capsys, paths, tmp_path, "--presence_temperature", "0")
    assert "--presence_temperature must be > 0" in err
    err = _refused(capsys, paths, tmp_path, "--presence_temperature", "0.5")  # this test model has no presence head
    assert "--presence_temperature" in err and "no presence head" in err and "leave it out" in err
    err = _refused(capsys, paths, tmp_path, "--outline_spread", "0.6")
    assert "--outline_spread must be in [0, 0.5]" in err
    err = _refused(capsys, paths, tmp_path, "--outline_spread", "0.3")  # the default sampler thresholds nothing
    assert "--outline_spread" in err and "only --sampler head" in err and "the sampler is autoregressive" in err
    err = _refused(capsys, paths, tmp_path, "--anchor_scales", "2")  # no anchor to take scales from
    assert "--anchor_scales 2" in err and "only --sampler anchored" in err and "add --sampler anchored" in err
    err = _refused(capsys, paths, tmp_path, "--sampler", "head")  # this test model has no U-Net head
    assert "--sampler head" in err and "without its U-Net head" in err
    err = _refused(capsys, paths, tmp_path, "--sampler", "anchored")
    assert "--sampler anchored" in err and "without its U-Net head" in err and "give --anchor FOLDER" in err
    err = _refused(capsys, paths, tmp_path, "--sampler", "prior")  # the Probabilistic U-Net's, not AR-Seg's
    assert "--sampler prior" in err and "draws with autoregressive, head, anchored" in err
    assert "--sampler must be autoregressive, head or anchored" in _refused(capsys, paths, tmp_path, "--sampler", "ar")
    err = _refused(capsys, paths, tmp_path, "--sampler", "head", "--anchor", tmp_path)
    assert "--anchor FOLDER samples with --sampler anchored" in err
    err = _refused(capsys, paths, tmp_path, "--anchor_head")  # the flag of 0.2
    assert "--anchor_head is gone" in err and "--sampler head" in err and "--sampler anchored" in err
    err = _refused(capsys, paths, tmp_path, "--anchor", tmp_path / "nothing")
    assert "--anchor" in err and "no such folder" in err
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    err = _refused(capsys, paths, tmp_path, "--anchor", anchors)
    assert f"no mask for {len(paths['cases'])} of {len(paths['cases'])} case(s)" in err
    assert f"{paths['cases'][0]}.png" in err and "nnUNetv2_predict" in err
    for case in paths["cases"]:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(anchors / f"{case}.png")
    err = _refused(capsys, paths, tmp_path, "--anchor", anchors, "--anchor_scales", "99")
    assert "--anchor_scales 99" in err and "scales" in err
    err = _refused(capsys, paths, tmp_path, "-prev_stage_predictions", anchors)
    assert "no previous stage" in err and "--anchor" in err


def test_a_folder_of_other_predictions_is_refused(paths, tmp_path, capsys):
    """Predictions this command did not write (e.g. nnUNetv2_predict's) are neither mixed with nor replaced."""
    out = tmp_path / "stock"
    out.mkdir()
    mask = out / f"{paths['cases'][0]}.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    before = mask.read_bytes()
    for flag in ([], ["--replace_outputs"]):
        with pytest.raises(SystemExit) as e:
            predict.main(["-i", str(paths["images"]), "-o", str(out), "-d", str(paths["dataset_id"]), "-c", "2d", "-f",
                          "0", "-device", "cpu", *flag])
        err = capsys.readouterr().err + str(e.value.code)
        assert "has no record of writing" in err and str(mask) in err and "another folder" in err
        assert sorted(out.iterdir()) == [mask] and mask.read_bytes() == before


def test_bad_inputs_are_refused(paths, tmp_path, capsys):
    image = _png(paths["images"] / f"{paths['cases'][0]}_0000.png")
    err = _refused(capsys, paths, tmp_path, inputs=tmp_path / "missing")
    assert "no such folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images ending in .png" in _refused(capsys, paths, tmp_path, inputs=empty)
    (empty / "scan_0000.jpg").write_bytes(b"")
    err = _refused(capsys, paths, tmp_path, inputs=empty)
    assert "scan_0000.jpg" in err and "convert them" in err
    bad = tmp_path / "bad"
    shutil.copytree(paths["images"], bad)
    Image.fromarray(image).save(bad / "scan.png")
    err = _refused(capsys, paths, tmp_path, inputs=bad)
    assert "scan.png" in err and "scan_0000.png" in err
    os.remove(bad / "scan.png")
    Image.fromarray(np.stack([image] * 3, -1)).save(bad / "colour_0000.png")
    err = _refused(capsys, paths, tmp_path, inputs=bad)
    assert "colour_0000.png has 3" in err and "grayscale" in err
    os.remove(bad / "colour_0000.png")
    Image.fromarray(image).save(bad / "second_0001.png")
    err = _refused(capsys, paths, tmp_path, inputs=bad)
    assert "case second" in err and "_0001" in err and "without gaps" in err
    os.remove(bad / "second_0001.png")
    cut = bad / f"{paths['cases'][0]}_0000.png"
    cut.write_bytes(cut.read_bytes()[:-40])  # cut short: the reader would not say which file
    err = _refused(capsys, paths, tmp_path, inputs=bad)
    assert cut.name in err and "copy it again" in err


def test_num_samples_flag_spellings(capsys):
    base = ["-i", "I", "-o", "O", "-d", "1", "-c", "2d"]
    assert predict.parse_args(base + ["--num_samples", "5"]).num_samples == 5
    assert predict.parse_args(base + ["-num_samples", "6"]).num_samples == 6
    assert "-num_samples is deprecated; use --num_samples" in capsys.readouterr().err
    assert predict.parse_args(base).num_samples is None  # the model's own default (or $nnUNet_ARSEG_NUM_SAMPLES)
    with pytest.raises(SystemExit):
        predict.parse_args(base + ["-part_id", "2", "-num_parts", "2"])
    with pytest.raises(SystemExit):
        predict.parse_args(base + ["-npp", "0", "-nps", "2"])
