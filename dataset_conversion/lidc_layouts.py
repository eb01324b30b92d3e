"""Readers of the public LIDC-IDRI crop layouts: each turns a folder into a list of cases with R rater masks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dataset_conversion.raw_dataset import ConversionError, check_case_id

NUM_RATERS = 4


@dataclass(frozen=True)
class LidcSlice:
    """One 2D crop of one nodule and its rater masks (LIDC-IDRI-slices layout)."""

    patient: str  # e.g. "LIDC-IDRI-0002"
    nodule: int
    slice_index: int
    image: Path
    rater_masks: tuple[Path, ...]  # mask-0 .. mask-(R-1), in rater order; may not exist


@dataclass(frozen=True)
class RaterCase:
    """One image with its rater masks, whatever the layout; ``split`` is the layout's own ("train"/"test") or None."""

    case: str
    patient: str
    image: Path
    raters: tuple[Path, ...]
    split: str | None


_PATIENT_RE = re.compile(r"^LIDC-IDRI-(\d+)$")
_NODULE_RE = re.compile(r"^nodule-(\d+)$")
_SLICE_RE = re.compile(r"^slice-(\d+)\.png$")
_DEEPMIND_SPLITS = {"train": "train", "val": "train", "test": "test"}
_CIMD_SPLITS = {"training": "train", "testing": "test"}


def find_lidc_slices(root: str | Path, num_raters: int = NUM_RATERS) -> list[LidcSlice]:
    """All slices of the LIDC-IDRI-slices layout below ``root``, sorted by patient, nodule and slice (numerically).

    Layout: ``LIDC-IDRI-XXXX/nodule-K/images/slice-N.png`` and ``mask-0..3/slice-N.png``. Rater mask paths are
    returned whether or not they exist; the converter checks them.
    """
    root = Path(root)
    slices: list[LidcSlice] = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name)):
        for nodule_dir in patient_dir.iterdir():
            m_nod = _NODULE_RE.match(nodule_dir.name)
            if m_nod is None or not (nodule_dir / "images").is_dir():
                continue
            for image in (nodule_dir / "images").iterdir():
                m_sl = _SLICE_RE.match(image.name)
                if m_sl is None:
                    continue
                masks = tuple(nodule_dir / f"mask-{k}" / image.name for k in range(num_raters))
                slices.append(LidcSlice(patient_dir.name, int(m_nod.group(1)), int(m_sl.group(1)), image, masks))
    slices.sort(key=lambda s: (s.patient, s.nodule, s.slice_index))
    return slices


def short_patient(pid: str) -> str:
    """``LIDC-IDRI-0002`` -> ``LIDC0002``; other ids keep their letters and digits."""
    m = _PATIENT_RE.match(pid)
    return f"LIDC{m.group(1)}" if m else re.sub(r"[^A-Za-z0-9]", "", pid)


def _slices_cases(root: Path, num_raters: int) -> list[RaterCase]:
    return [RaterCase(check_case_id(f"{short_patient(s.patient)}_n{s.nodule}_s{s.slice_index:02d}", s.image),
                      s.patient, s.image, s.rater_masks, None)
            for s in find_lidc_slices(root, num_raters)]


def _deepmind_name(name: str) -> str:
    # "z-105.0_c0" -> "z105p0_c0"; a second '-' is a minus sign: "z--3.5_c1" -> "zm3p5_c1"
    name = re.sub(r"(?<=-)-", "m", name.replace(".", "p"))
    return re.sub(r"[^A-Za-z0-9_]", "", name)


def _deepmind_cases(root: Path, num_raters: int) -> list[RaterCase]:
    cases = []
    for split_dir in sorted(p for p in root.iterdir() if p.name in _DEEPMIND_SPLITS):
        image_root, gt_root = split_dir / "images", split_dir / "gt"
        if not image_root.is_dir():
            raise ConversionError(f"{image_root} is missing; the DeepMind layout is {{train,val,test}}/images/<pid>/"
                                  "<name>.png with {train,val,test}/gt/<pid>/<name>_l0..3.png")
        for image in sorted(image_root.glob("*/*.png")):
            pid = image.parent.name
            masks = tuple(gt_root / pid / f"{image.stem}_l{k}.png" for k in range(num_raters))
            case = check_case_id(f"{short_patient(pid)}_{_deepmind_name(image.stem)}", image)
            cases.append(RaterCase(case, pid, image, masks, _DEEPMIND_SPLITS[split_dir.name]))
    return cases


def _cimd_cases(root: Path, num_raters: int) -> list[RaterCase]:
    cases = []
    for split_dir in sorted(p for p in root.iterdir() if p.name in _CIMD_SPLITS):
        split = _CIMD_SPLITS[split_dir.name]
        for case_dir in sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
            images = sorted(case_dir.glob("image_*.jpg"))
            if len(images) != 1:
                raise ConversionError(f"{case_dir}: expected exactly one image_*.jpg, found {len(images)}; "
                                      "keep one image per case folder")
            masks = tuple(case_dir / f"label{k}_.jpg" for k in range(num_raters))
            # the layout does not say which crops share a patient, so every crop is its own group
            case = check_case_id(f"CIMD_{'tr' if split == 'train' else 'ts'}{case_dir.name.zfill(3)}", case_dir)
            cases.append(RaterCase(case, case, images[0], masks, split))
    return cases


def detect_layout(root: str | Path) -> str:
    """``"slices"``, ``"deepmind"`` or ``"cimd"``; an error naming the expected layouts otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"input folder {root} does not exist; pass the folder that holds the LIDC crops with -i")
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if any(_PATIENT_RE.match(n) for n in names):
        return "slices"
    if names & set(_DEEPMIND_SPLITS) and any((root / n / "images").is_dir() for n in names & set(_DEEPMIND_SPLITS)):
        return "deepmind"
    if names & set(_CIMD_SPLITS):
        return "cimd"
    raise ConversionError(
        f"no LIDC crops found in {root}: expected LIDC-IDRI-XXXX/nodule-K/images/slice-N.png (+ mask-0..3/), "
        "{train,val,test}/images/<pid>/<name>.png (+ gt/<pid>/<name>_l0..3.png) or "
        "{training,testing}/<id>/image_*.jpg (+ label0..3_.jpg)")


def find_rater_cases(root: str | Path, num_raters: int = NUM_RATERS) -> tuple[str, list[RaterCase]]:
    """The layout of ``root`` and its cases in a deterministic order; an empty input is an error."""
    root = Path(root)
    layout = detect_layout(root)
    reader = {"slices": _slices_cases, "deepmind": _deepmind_cases, "cimd": _cimd_cases}[layout]
    cases = reader(root, num_raters)
    if not cases:
        raise ConversionError(f"{root} looks like the {layout} layout but holds no image; check the -i folder")
    return layout, cases
