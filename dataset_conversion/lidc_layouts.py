"""Readers of the public LIDC-IDRI crop layouts: each turns a folder into a list of cases with R rater masks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dataset_conversion.raw_dataset import ConversionError, check_case_id, input_entries, name_list

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


def scan_lidc_slices(root: str | Path, num_raters: int = NUM_RATERS) -> tuple[list[LidcSlice], dict[str, str]]:
    """The slices of the LIDC-IDRI-slices layout below ``root`` and what was left out ({path: why}).

    Layout: ``LIDC-IDRI-XXXX/nodule-K/images/slice-N.png`` and ``mask-0..3/slice-N.png``; folder and file names
    are matched without regard to case (``Images/``, ``slice-1.PNG``). A patient folder with a suffix
    (``LIDC-IDRI-0002_rescan``) stays with its patient, for the split by patient, and its suffix goes into the case
    id. Slices are sorted by patient, series, nodule and slice (numerically). Rater mask paths are returned whether
    or not they exist; the converter checks them. A mask file no image goes with is left out.
    """
    root = Path(root)
    slices: list[LidcSlice] = []
    left_out: dict[str, str] = {}
    for patient_dir in input_entries(root, documents=False):
        m_pat = _PATIENT_RE.match(patient_dir.name)
        if not patient_dir.is_dir() or m_pat is None:
            left_out[str(patient_dir)] = "not a patient folder (LIDC-IDRI-XXXX/)"
            continue
        patient, series = f"LIDC-IDRI-{m_pat.group(1)}", re.sub(r"[^A-Za-z0-9]+", "", m_pat.group(2))
        for nodule_dir in input_entries(patient_dir, documents=False):
            m_nod = _NODULE_RE.match(nodule_dir.name)
            if m_nod is None or not nodule_dir.is_dir():
                left_out[str(nodule_dir)] = "not a nodule folder (nodule-K/)"
                continue
            sub = {p.name.lower(): p for p in input_entries(nodule_dir, documents=False)}
            if "images" not in sub or not sub["images"].is_dir():
                left_out[str(nodule_dir)] = "no images/ folder in it"
                continue
            mask_dirs = {int(m.group(1)): p for n, p in sub.items() if (m := _MASK_RE.match(n)) and p.is_dir()}
            for n, p in sub.items():
                if n == "images":
                    continue
                m_mask = _MASK_RE.match(n) if p.is_dir() else None
                if m_mask is None:
                    left_out[str(p)] = "not images/ or a mask-K/ folder"
                elif int(m_mask.group(1)) >= num_raters:
                    left_out[str(p)] = f"only mask-0..{num_raters - 1} are read"
            mask_files = {k: {f.name.lower(): f for f in input_entries(mask_dirs[k])} if k in mask_dirs else {}
                          for k in range(num_raters)}
            read = set()
            for image in input_entries(sub["images"]):
                m_sl = _SLICE_RE.match(image.name)
                if m_sl is None or not image.is_file():
                    left_out[str(image)] = "not a slice-N.png image"
                    continue
                read.add(image.name.lower())
                masks = tuple(mask_files[k].get(image.name.lower(), nodule_dir / f"mask-{k}" / image.name)
                              for k in range(num_raters))
                slices.append(LidcSlice(patient, int(m_nod.group(1)), int(m_sl.group(1)), image, masks, series))
            for files in mask_files.values():
                for name, f in files.items():
                    if name not in read:
                        left_out[str(f)] = f"no image {sub['images'].name}/{f.name} goes with this mask"
    slices.sort(key=lambda s: (s.patient, s.series, s.nodule, s.slice_index))
    return slices, left_out


def find_lidc_slices(root: str | Path, num_raters: int = NUM_RATERS) -> list[LidcSlice]:
    """All slices of the LIDC-IDRI-slices layout below ``root`` (see ``scan_lidc_slices``)."""
    return scan_lidc_slices(root, num_raters)[0]


def short_patient(pid: str) -> str:
    """``LIDC-IDRI-0002`` -> ``LIDC0002``; other ids keep their letters and digits."""
    m = _PATIENT_RE.match(pid)
    return f"LIDC{m.group(1)}" if m and not m.group(2) else re.sub(r"[^A-Za-z0-9]", "", pid)


def _slices_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], dict[str, str]]:
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


def _deepmind_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], dict[str, str]]:
    cases, left_out = [], {}
    for split_dir in input_entries(root, documents=False):
        if split_dir.name not in _DEEPMIND_SPLITS or not split_dir.is_dir():
            left_out[str(split_dir)] = "not a split folder (train/, val/, test/)"
            continue
        image_root, gt_root = split_dir / "images", split_dir / "gt"
        if not image_root.is_dir():
            raise ConversionError(f"{image_root} is missing; the DeepMind layout is {{train,val,test}}/images/<pid>/"
                                  "<name>.png with {train,val,test}/gt/<pid>/<name>_l0..3.png")
        left_out.update({str(p): "not images/ or gt/" for p in input_entries(split_dir, documents=False)
                         if p.name not in ("images", "gt")})
        pids = set()
        for pid_dir in input_entries(image_root, documents=False):
            if not pid_dir.is_dir():
                left_out[str(pid_dir)] = "not a patient folder (images/<pid>/)"
                continue
            pids.add(pid_dir.name)
            files = input_entries(pid_dir)
            left_out.update({str(f): "not a .png image" for f in files
                             if not (f.is_file() and f.suffix.lower() == ".png")})
            gt_dir = gt_root / pid_dir.name
            gt_files = {f.name.lower(): f for f in input_entries(gt_dir)} if gt_dir.is_dir() else {}
            for image in (f for f in files if f.is_file() and f.suffix.lower() == ".png"):
                pid = image.parent.name
                names = [f"{image.stem}_l{k}.png" for k in range(num_raters)]
                masks = tuple(gt_files.pop(n.lower(), gt_dir / n) for n in names)
                case = check_case_id(f"{short_patient(pid)}_{_deepmind_name(image.stem)}", image)
                cases.append(RaterCase(case, pid, image, masks, _DEEPMIND_SPLITS[split_dir.name]))
            left_out.update({str(f): f"not the mask <name>_l0..{num_raters - 1}.png of an image in "
                                     f"images/{pid_dir.name}/" for f in gt_files.values()})
        if gt_root.is_dir():
            left_out.update({str(p): "no images/<pid>/ folder goes with it"
                             for p in input_entries(gt_root, documents=False) if p.name not in pids})
    return cases, left_out


def _cimd_cases(root: Path, num_raters: int) -> tuple[list[RaterCase], dict[str, str]]:
    cases, left_out = [], {}
    for split_dir in input_entries(root, documents=False):
        if split_dir.name not in _CIMD_SPLITS or not split_dir.is_dir():
            left_out[str(split_dir)] = "not a split folder (training/, testing/)"
            continue
        split = _CIMD_SPLITS[split_dir.name]
        entries = input_entries(split_dir, documents=False)
        left_out.update({str(p): "not a case folder (<id>/)" for p in entries if not p.is_dir()})
        for case_dir in sorted((p for p in entries if p.is_dir()), key=lambda p: (len(p.name), p.name)):
            images = sorted(case_dir.glob("image_*.jpg"))
            if len(images) != 1:
                raise ConversionError(f"{case_dir}: expected exactly one image_*.jpg, found {len(images)}; "
                                      "keep one image per case folder")
            masks = tuple(case_dir / f"label{k}_.jpg" for k in range(num_raters))
            left_out.update({str(p): f"not image_*.jpg or label0..{num_raters - 1}_.jpg"
                             for p in input_entries(case_dir, documents=False) if p not in (*images, *masks)})
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


def find_rater_cases(root: str | Path, num_raters: int = NUM_RATERS
                     ) -> tuple[str, list[RaterCase], dict[str, str]]:
    """The layout of ``root``, its cases in a deterministic order and what was left out ({path: why}: folders and
    files that do not fit the layout); an input without cases is an error."""
    root = Path(root)
    layout = detect_layout(root)
    reader = {"slices": _slices_cases, "deepmind": _deepmind_cases, "cimd": _cimd_cases}[layout]
    cases, left_out = reader(root, num_raters)
    if not cases:
        raise ConversionError(f"{root} looks like the {layout} layout but holds no image"
                              + (f"; left out as not fitting the layout: {name_list(list(left_out))}"
                                 if left_out else "") + "; check the -i folder")
    return layout, cases, left_out
