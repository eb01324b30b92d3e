"""Readers of the public LIDC-IDRI crop layouts: each turns a folder into a list of cases with R rater masks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dataset_conversion.raw_dataset import ConversionError, check_case_id, name_list

NUM_RATERS = 4


@dataclass(frozen=True)
class LidcSlice:
    """One 2D crop of one nodule and its rater masks (LIDC-IDRI-slices layout)."""

    patient: str  # e.g. "LIDC-IDRI-0002"
    nodule: int
    slice_index: int
    image: Path
    rater_masks: tuple[Path, ...]  # mask-0 .. mask-(R-1), in rater order; may not exist
    series: str = ""  # what follows the patient id in its folder name ("LIDC-IDRI-0002_rescan" -> "rescan")


@dataclass(frozen=True)
class RaterCase:
    """One image with its rater masks, whatever the layout; ``split`` is the layout's own ("train"/"test") or None."""

    case: str
    patient: str
    image: Path
    raters: tuple[Path, ...]
    split: str | None


_PATIENT_RE = re.compile(r"^LIDC-IDRI-(\d+)(.*)$", re.IGNORECASE)
_NODULE_RE = re.compile(r"^nodule-(\d+)$", re.IGNORECASE)
_SLICE_RE = re.compile(r"^slice-(\d+)\.png$", re.IGNORECASE)
_MASK_RE = re.compile(r"^mask-(\d+)$", re.IGNORECASE)
_DEEPMIND_SPLITS = {"train": "train", "val": "train", "test": "test"}
_CIMD_SPLITS = {"training": "train", "testing": "test"}


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` without hidden ones (``.DS_Store``, our own ``.tmp-*``), sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def scan_lidc_slices(root: str | Path, num_raters: int = NUM_RATERS) -> tuple[list[LidcSlice], list[str]]:
    """The slices of the LIDC-IDRI-slices layout below ``root`` and what was left out (paths relative to ``root``).

    Layout: ``LIDC-IDRI-XXXX/nodule-K/images/slice-N.png`` and ``mask-0..3/slice-N.png``; folder and file names
    are matched without regard to case (``Images/``, ``slice-1.PNG``). A patient folder with a suffix
    (``LIDC-IDRI-0002_rescan``) stays with its patient, for the split by patient, and its suffix goes into the case
    id. Slices are sorted by patient, series, nodule and slice (numerically). Rater mask paths are returned whether
    or not they exist; the converter checks them.
    """
    root = Path(root)
    slices: list[LidcSlice] = []
    left_out: list[str] = []
    for patient_dir in _visible(root):
        m_pat = _PATIENT_RE.match(patient_dir.name)
        if not patient_dir.is_dir() or m_pat is None:
            if patient_dir.is_dir():
                left_out.append(_rel(patient_dir, root))
            continue
        patient, series = f"LIDC-IDRI-{m_pat.group(1)}", re.sub(r"[^A-Za-z0-9]+", "", m_pat.group(2))
        for nodule_dir in _visible(patient_dir):
            m_nod = _NODULE_RE.match(nodule_dir.name)
            sub = {p.name.lower(): p for p in _visible(nodule_dir)} if nodule_dir.is_dir() else {}
            if m_nod is None or "images" not in sub or not sub["images"].is_dir():
                left_out.append(_rel(nodule_dir, root) + ("" if m_nod is None else " (no images/ folder)"))
                continue
            mask_dirs = {int(m.group(1)): p for n, p in sub.items() if (m := _MASK_RE.match(n)) and p.is_dir()}
            left_out += [_rel(p, root) + f" (only mask-0..{num_raters - 1} are read)"
                         for k, p in sorted(mask_dirs.items()) if k >= num_raters]
            left_out += [_rel(p, root) for n, p in sorted(sub.items())
                         if n != "images" and not (_MASK_RE.match(n) and p.is_dir())]
            mask_files = {k: {f.name.lower(): f for f in _visible(mask_dirs[k])} if k in mask_dirs else {}
                          for k in range(num_raters)}
            for image in _visible(sub["images"]):
                m_sl = _SLICE_RE.match(image.name)
                if m_sl is None or not image.is_file():
                    left_out.append(_rel(image, root))
                    continue
                masks = tuple(mask_files[k].get(image.name.lower(), nodule_dir / f"mask-{k}" / image.name)
                              for k in range(num_raters))
                slices.append(LidcSlice(patient, int(m_nod.group(1)), int(m_sl.group(1)), image, masks, series))
    slices.sort(key=lambda s: (s.patient, s.series, s.nodule, s.slice_index))
    return slices, left_out


def find_lidc_slices(root: str | Path, num_raters: int = NUM_RATERS) -> list[LidcSlice]:
    """All slices of the LIDC-IDRI-slices layout below ``root`` (see ``scan_lidc_slices``)."""
    return scan_lidc_slices(root, num_raters)[0]


def short_patient(pid: str) -> str:
    """``LIDC-IDRI-0002`` -> ``LIDC0002``; other ids keep their letters and digits."""
    m = _PATIENT_RE.match(pid)
    return f"LIDC{m.group(1)}" if m and not m.group(2) else re.sub(r"[^A-Za-z0-9]", "", pid)


def _slices_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], list[str]]:
    slices, left_out = scan_lidc_slices(root, num_raters)
    cases = [RaterCase(check_case_id(f"{short_patient(s.patient)}{'_' + s.series if s.series else ''}"
                                     f"_n{s.nodule}_s{s.slice_index:02d}", s.image), s.patient, s.image,
                       s.rater_masks, None)
             for s in slices]
    return cases, left_out


def _deepmind_name(name: str) -> str:
    # "z-105.0_c0" -> "z105p0_c0"; a second '-' is a minus sign: "z--3.5_c1" -> "zm3p5_c1"
    name = re.sub(r"(?<=-)-", "m", name.replace(".", "p"))
    return re.sub(r"[^A-Za-z0-9_]", "", name)


def _deepmind_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], list[str]]:
    cases, left_out = [], []
    for split_dir in _visible(root):
        if split_dir.name not in _DEEPMIND_SPLITS:
            left_out += [_rel(split_dir, root)] if split_dir.is_dir() else []
            continue
        image_root, gt_root = split_dir / "images", split_dir / "gt"
        if not image_root.is_dir():
            raise ConversionError(f"{image_root} is missing; the DeepMind layout is {{train,val,test}}/images/<pid>/"
                                  "<name>.png with {train,val,test}/gt/<pid>/<name>_l0..3.png")
        for pid_dir in _visible(image_root):
            if not pid_dir.is_dir():
                left_out.append(_rel(pid_dir, root))
                continue
            files = _visible(pid_dir)
            left_out += [_rel(f, root) for f in files if not (f.is_file() and f.suffix.lower() == ".png")]
            gt_dir = gt_root / pid_dir.name
            gt_files = {f.name.lower(): f for f in _visible(gt_dir)} if gt_dir.is_dir() else {}
            for image in (f for f in files if f.is_file() and f.suffix.lower() == ".png"):
                pid = image.parent.name
                masks = tuple(gt_files.get(f"{image.stem}_l{k}.png".lower(), gt_dir / f"{image.stem}_l{k}.png")
                              for k in range(num_raters))
                case = check_case_id(f"{short_patient(pid)}_{_deepmind_name(image.stem)}", image)
                cases.append(RaterCase(case, pid, image, masks, _DEEPMIND_SPLITS[split_dir.name]))
    return cases, left_out


def _cimd_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], list[str]]:
    cases, left_out = [], []
    for split_dir in _visible(root):
        if split_dir.name not in _CIMD_SPLITS:
            left_out += [_rel(split_dir, root)] if split_dir.is_dir() else []
            continue
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
    return cases, left_out


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


def find_rater_cases(root: str | Path, num_raters: int = NUM_RATERS) -> tuple[str, list[RaterCase], list[str]]:
    """The layout of ``root``, its cases in a deterministic order and what was left out (paths relative to
    ``root``: folders and files that do not fit the layout); an input without cases is an error."""
    root = Path(root)
    layout = detect_layout(root)
    reader = {"slices": _slices_cases, "deepmind": _deepmind_cases, "cimd": _cimd_cases}[layout]
    cases, left_out = reader(root, num_raters)
    if not cases:
        raise ConversionError(f"{root} looks like the {layout} layout but holds no image"
                              + (f"; left out as not fitting the layout: {name_list(left_out)}" if left_out else "")
                              + "; check the -i folder")
    return layout, cases, left_out
