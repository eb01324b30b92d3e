"""Writing an nnU-Net raw dataset safely: staged in a hidden sibling folder, every file atomic, no silent overwrite."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_arseg.atomic import write_atomic

CONVERTED_BY = "nnunet_arseg dataset_conversion"  # dataset.json "converted_by": marks folders --overwrite may replace


class ConversionError(RuntimeError):
    """Bad input or a refused action; the message names the file and the fix."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 0 < dataset_id < 1000:
        raise ConversionError(f"dataset id must be 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ConversionError(f"dataset name {name!r} must be letters, digits, '_' or '-' (e.g. LIDC)")
    return f"Dataset{dataset_id:03d}_{name}"


_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def check_case_id(case: str, source: str | Path) -> str:
    """A case id nnU-Net can use: no path characters and no ``_XXXX`` tail that reads like a channel suffix."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", case) or _CHANNEL_SUFFIX.search(case):
        raise ConversionError(f"{source}: derived case id {case!r} is not a valid nnU-Net identifier "
                              "(letters, digits, '_' and '-', not ending in '_' + 4 digits); rename the input")
    return case


def check_unique_cases(sources: dict[str, list[str]]) -> None:
    """``sources`` maps case id -> the inputs it came from; two inputs with one id is an error."""
    dups = {c: s for c, s in sources.items() if len(s) > 1}
    if dups:
        case, files = next(iter(dups.items()))
        raise ConversionError(f"duplicated case id {case!r} from {files} ({len(dups)} duplicated id(s) in all); "
                              "each input must map to its own case: remove or rename the duplicate")


def name_list(items: Sequence[str], limit: int = 8) -> str:
    """``a, b, c`` or ``a, b, ... (and 12 more)``: names for a message that stays readable."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... (and {len(items) - limit} more)" if len(items) > limit else "")


def warn(message: str) -> None:
    """A warning on stderr: the run goes on, but the user must see what was left out."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


_LITTER = {"__macosx", "thumbs.db", "desktop.ini"}  # written by file managers and archivers, never data
_DOCUMENT_ENDINGS = (".md", ".txt", ".rst", ".pdf", ".csv", ".tsv", ".json", ".html")
_DOCUMENT_NAMES = ("readme", "license", "licence", "copying")


def input_entries(folder: Path, documents: bool = True) -> list[Path]:
    """The entries of ``folder`` a converter considers, sorted by name; everything else is never named as left out.

    Hidden entries (``.DS_Store``, our own ``.tmp-*``) and file-manager litter (``__MACOSX``, ``Thumbs.db``,
    ``desktop.ini``) are never inputs. ``documents=False`` also drops notes and licences (``README``, ``LICENSE``,
    ``*.md``, ``*.txt``, ``*.pdf``, ``*.csv``, ``*.json``, ...): for the levels of a layout that hold folders or a
    case's files, where such files sit beside the data; in a folder of images or masks every file counts.
    """
    def kept(p: Path) -> bool:
        name = p.name.lower()
        if name.startswith(".") or name in _LITTER:
            return False
        is_document = name.endswith(_DOCUMENT_ENDINGS) or name.split(".", 1)[0] in _DOCUMENT_NAMES
        return documents or p.is_dir() or not is_document

    return sorted(p for p in Path(folder).iterdir() if kept(p))


def report_left_out(left_out: dict[str, str], strict: bool, fix: str) -> None:
    """Name every input left out (``left_out``: path -> why) in one warning on stderr, or refuse under ``--strict``.

    Called before anything is written; ``fix`` says how to bring the inputs in (e.g. the layout's names).
    """
    if not left_out:
        return
    listing = "\n".join(f"  {path}: {why}" for path, why in sorted(left_out.items()))
    if strict:
        raise ConversionError(f"--strict: {len(left_out)} folder(s) or file(s) of the input would be left out:\n"
                              f"{listing}\n{fix}, or leave out --strict to convert without them")
    warn(f"{len(left_out)} folder(s) or file(s) of the input were left out (not converted):\n{listing}\n{fix}; "
         "--strict refuses instead")


def left_out_record(left_out: dict[str, str]) -> list[str]:
    """``dataset.json["arseg_conversion"]["left_out"]``: one ``"path: why"`` per input left out."""
    return [f"{path}: {why}" for path, why in sorted(left_out.items())]


def save_png(arr_HW: np.ndarray, path: str | Path) -> None:
    """A 2D uint8 (bool is stored as 0/1) or uint16 array as a lossless grey PNG."""
    from PIL import Image

    if arr_HW.dtype not in (np.uint8, np.uint16):
        arr_HW = arr_HW.astype(np.uint8)
    write_atomic(path, lambda tmp: Image.fromarray(np.ascontiguousarray(arr_HW)).save(tmp, format="PNG"))


def copy_file(src: str | Path, dst: str | Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def _owned_by_us(folder: Path) -> bool:
    try:
        return load_json(str(folder / "dataset.json")).get("converted_by") == CONVERTED_BY
    except (OSError, ValueError):
        return False


def nnunet_id_folders() -> dict[str, Path]:
    """``$nnUNet_preprocessed`` and ``$nnUNet_results`` where set: a new dataset id must be free there as well."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    return {env.env_var_name: Path(env.get()) for env in (nnUNet_preprocessed, nnUNet_results) if env.is_set()}


def check_dataset_id_free(dataset_id: int, name: str, folders: dict[str, Path]) -> None:
    """Refuse an id that another dataset name already uses in any of ``folders`` ({label: folder}).

    nnU-Net resolves ``-d 8`` by looking for ``Dataset008_*`` in nnUNet_raw, nnUNet_preprocessed and nnUNet_results
    together and fails ("More than one dataset name found") when they disagree.
    """
    final_name = dataset_folder_name(dataset_id, name)
    for label, folder in folders.items():
        others = sorted(p.name for p in Path(folder).glob(f"Dataset{dataset_id:03d}_*")
                        if p.is_dir() and p.name != final_name)
        if others:
            raise ConversionError(
                f"{Path(folder) / others[0]} ({label}) already uses dataset id {dataset_id}; nnU-Net needs one "
                f"dataset name per id across nnUNet_raw, nnUNet_preprocessed and nnUNet_results: choose another -d, "
                f"or -n {others[0].split('_', 1)[1]} if this is that dataset, or remove that folder yourself")


@contextmanager
def staged_dataset(raw_folder: str | Path, dataset_id: int, name: str, overwrite: bool,
                   id_folders: dict[str, Path] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder ``.DatasetXXX_NAME.partial``; on success move it to ``DatasetXXX_NAME``.

    Refuses when the final folder exists (unless ``overwrite`` and it was written by these converters) or when
    another dataset name already uses the id in ``raw_folder`` or in ``id_folders`` (default: the nnU-Net
    preprocessed and results folders, ``nnunet_id_folders()``). The old dataset is only removed after the new one
    is in place. On failure the staging folder is removed and nothing else is touched.
    """
    raw_folder = Path(raw_folder)
    final = raw_folder / dataset_folder_name(dataset_id, name)
    check_dataset_id_free(dataset_id, name, {"nnUNet_raw": raw_folder,
                                             **(nnunet_id_folders() if id_folders is None else id_folders)})
    if final.exists():
        if not overwrite:
            raise ConversionError(f"{final} exists; pass --overwrite to replace it or choose another -d/-n")
        if not _owned_by_us(final):
            raise ConversionError(f"{final} exists and was not written by this converter (dataset.json has no "
                                  f"converted_by={CONVERTED_BY!r}); move or delete it yourself")
    raw_folder.mkdir(parents=True, exist_ok=True)
    staging = raw_folder / f".{final.name}.partial"
    if staging.exists():  # our own leftover from an interrupted run; never trusted
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        old = raw_folder / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


def converter_parser(prog: str, description: str, input_help: str, default_name: str) -> argparse.ArgumentParser:
    """The flags every converter shares: ``-i -o -d -n --overwrite --strict --disable_progress_bar``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-i", required=True, help=input_help)
    parser.add_argument("-o", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-d", type=int, required=True, help="dataset id (1..999)")
    parser.add_argument("-n", default=default_name, help=f"dataset name (default {default_name})")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset this converter wrote before")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (exit 1, listing them) when any folder or file of the input would be left out "
                             "for not fitting the layout; default: convert the rest and name every one left out, "
                             "with why, in one warning before writing. Hidden files (.DS_Store), __MACOSX and "
                             "Thumbs.db are never inputs, nor are notes and licences (README, *.md, *.txt, *.pdf, "
                             "*.csv, *.json) beside the folders")
    parser.add_argument("--disable_progress_bar", action="store_true")
    return parser


def run_converter(parser: argparse.ArgumentParser, args: argparse.Namespace, convert) -> None:
    """Call ``convert(raw_folder)`` with ``-o`` or ``$nnUNet_raw``; a ``ConversionError`` ends with its message."""
    from nnunetv2.paths import nnUNet_raw

    raw = args.o if args.o is not None else nnUNet_raw
    if raw is None:
        parser.error("-o not given and nnUNet_raw is not set")
    try:
        convert(raw)
    except ConversionError as e:
        sys.exit(f"{parser.prog}: error: {e}")
