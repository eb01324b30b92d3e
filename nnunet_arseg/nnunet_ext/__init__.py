"""Folder that ``nnUNet_extTrainer`` points at.

nnU-Net imports every module in this folder as a *top-level* module and removes it again after the
trainer lookup, so the folder holds only a thin shim that re-exports the trainers from the installed
package (the classes then pickle by their real module path, see ``docs/`` and nnU-Net's find_objects).
"""
import os

EXT_DIR = os.path.dirname(os.path.abspath(__file__))


def print_ext_dir() -> None:
    """Print the folder to export as ``nnUNet_extTrainer``."""
    print(EXT_DIR)


def ensure_ext_trainer_env() -> None:
    """Append this folder to ``nnUNet_extTrainer`` of the current process (used by our own commands)."""
    dirs = [d for d in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if d]
    if EXT_DIR not in dirs:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(dirs + [EXT_DIR])
