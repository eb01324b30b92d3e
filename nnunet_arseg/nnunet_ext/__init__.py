"""Folder that ``nnUNet_extTrainer`` points at.

nnU-Net imports every module in this folder as a *top-level* module and removes it again after the
trainer lookup, so the folder holds only a thin shim that re-exports the trainers from the installed
package (the classes then pickle by their real module path, see ``docs/`` and nnU-Net's find_objects).
"""
from __future__ import annotations

import os

EXT_DIR = os.path.dirname(os.path.abspath(__file__))


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with this folder appended: the folders already listed there are kept (nnU-Net searches
    every folder of the ``os.pathsep``-separated list)."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    dirs = [d for d in current.split(os.pathsep) if d]
    return os.pathsep.join(dirs + ([EXT_DIR] if EXT_DIR not in dirs else []))


def print_ext_dir() -> None:
    """Print the value to export as ``nnUNet_extTrainer``: what it holds now, with this folder added."""
    print(ext_trainer_value())


def ensure_ext_trainer_env() -> None:
    """Add this folder to ``nnUNet_extTrainer`` of the current process (used by our own commands)."""
    os.environ["nnUNet_extTrainer"] = ext_trainer_value()
