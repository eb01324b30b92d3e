"""The demo's figures (``write_case_figures``) on one real LIDC case of the bundled sample, without training.

The prediction folder is laid out as ``nnUNetv2_arseg_predict`` writes it (docs/design.md, "Prediction output"):
its samples are the real rater masks of the case and of the next slice, its consensus their majority and its
uncertainty their binary entropy (``nnunet_arseg.consensus``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_conversion.lidc import convert_lidc
from nnunet_arseg.consensus import binary_entropy_bits, majority_vote, vote_frequency
from nnunet_arseg.demo import write_case_figures
from nnunet_arseg.prediction_files import sample_file

TAB_RED = np.array([214, 39, 40])  # matplotlib's tab:red, the contour colour


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def raw_and_case(lidc_demo, tmp_path_factory) -> tuple[Path, str, np.ndarray]:
    """A raw dataset (train LIDC-IDRI-0005, test LIDC-IDRI-0014), a test case where all four raters mark the nodule
    and its (8, H, W) 'samples': its 4 raters and those of the next slice."""
    root = tmp_path_factory.mktemp("demo")
    for folder, patient in (("train", "LIDC-IDRI-0005"), ("test", "LIDC-IDRI-0014")):
        (root / folder).mkdir()
        (root / folder / patient).symlink_to(lidc_demo / patient)
    raw = convert_lidc(root / "train", root / "raw", 950, progress=False, test_input_folder=root / "test")
    raters = lambda c: np.stack([_png(raw / "labelsTs_raters" / f"{c}_r{k}.png") for k in range(4)])  # noqa: E731
    cases = sorted(p.name[:-len("_0000.png")] for p in (raw / "imagesTs").iterdir())
    case, nxt = next((c, n) for c, n in zip(cases, cases[1:]) if raters(c).sum(0).max() == 4 and c[:-2] == n[:-2])
    return raw, case, np.concatenate([raters(case), raters(nxt)]).astype(bool)


def _prediction(folder: Path, case: str, samples_NHW: np.ndarray, scales: bool) -> Path:
    (folder / "samples").mkdir(parents=True)
    (folder / "uncertainty").mkdir()
    s = torch.from_numpy(samples_NHW)
    Image.fromarray(majority_vote(s).numpy().astype(np.uint8)).save(folder / f"{case}.png")
    for k, mask in enumerate(samples_NHW):
        Image.fromarray(mask.astype(np.uint8)).save(sample_file(str(folder), case, k, ".png"))
    np.savez_compressed(folder / "uncertainty" / f"{case}.npz",
                        uncertainty=binary_entropy_bits(vote_frequency(s)).numpy().astype(np.float32))
    if scales:  # one sample at 1/4, 1/2 and full resolution, side by side, saved as the predictor saves it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        (folder / "scales").mkdir()
        m = samples_NHW[0]
        strip = np.concatenate([m[::f, ::f].repeat(f, 0).repeat(f, 1) for f in (4, 2, 1)], axis=1)
        plt.imsave(folder / "scales" / f"{case}.png", strip.astype(np.float32), cmap="gray", vmin=0, vmax=1)
    return folder


def test_case_figure(raw_and_case, tmp_path):
    raw, case, samples = raw_and_case
    sizes = {}
    for scales in (False, True):
        pred = _prediction(tmp_path / f"pred_{scales}", case, samples, scales)
        (fig,) = write_case_figures(str(raw), str(pred), str(tmp_path / f"fig_{scales}"))
        assert Path(fig) == tmp_path / f"fig_{scales}" / f"{case}.png"
        rgb = _png(fig)[..., :3].astype(int)
        sizes[scales] = rgb.shape[:2]
        # a 3-row (input, raters, samples) or 4-row (+ scales) grid of 8 columns of square panels
        rows = 4 if scales else 3
        assert 0.9 < (rgb.shape[1] / rgb.shape[0]) / (8 * 1.9 / (rows * 2.1)) < 1.1, rgb.shape
        # not blank: the CT crop in many grey levels, and the red contours of the masks in every row
        grey = rgb[(rgb.max(-1) - rgb.min(-1)) < 3]
        assert len(np.unique(grey[:, 0])) > 100
        red_per_row = [(np.abs(band - TAB_RED).sum(-1) < 60).sum() for band in np.array_split(rgb, rows, axis=0)]
        assert min(red_per_row) > 20, red_per_row
    assert sizes[True][0] > sizes[False][0] * 1.2 and abs(sizes[True][1] - sizes[False][1]) < 0.1 * sizes[False][1]
