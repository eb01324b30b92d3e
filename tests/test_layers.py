"""The package's layering (docs/design.md, "Layers"): a module imports only from its own layer or the layers below,
and training and inference never import each other. Read from the source with ``ast``, so a lazy import inside a
function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_arseg"

# lowest first; a module's layer is that of the longest matching prefix
LAYERS = [
    ("foundation", ["nnunet_arseg.atomic", "nnunet_arseg.env", "nnunet_arseg.io_checks", "nnunet_arseg.config",
                    "nnunet_arseg.prediction_files", "nnunet_arseg.nnunet_ext"]),
    ("model parts", ["nnunet_arseg.tokenizer", "nnunet_arseg.segmentor", "nnunet_arseg.consensus"]),
    ("network", ["nnunet_arseg.network", "nnunet_arseg.baselines"]),
    ("evaluation and tiling", ["nnunet_arseg.evaluation", "nnunet_arseg.sampling_window", "nnunet_arseg.figures"]),
    ("commands and trainers", ["nnunet_arseg.training", "nnunet_arseg.inference"]),
    ("entry points", ["nnunet_arseg.nnunet_ext.nnunet_arseg_trainers", "nnunet_arseg.demo"]),
]
NEVER = [("nnunet_arseg.training", "nnunet_arseg.inference"), ("nnunet_arseg.inference", "nnunet_arseg.training")]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nnunet_arseg")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nnunet_arseg"):
            for a in node.names:  # "from nnunet_arseg import env" imports the module nnunet_arseg.env
                candidate = f"{node.module}.{a.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else node.module)
    return found - {"nnunet_arseg"}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "demo_data" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    here = module_name(path)
    for target in our_imports(path):
        assert layer_of(target) <= layer_of(here), (
            f"{here} ({LAYERS[layer_of(here)][0]}) imports {target} ({LAYERS[layer_of(target)][0]}), a higher layer")
        for a, b in NEVER:
            assert not (here.startswith(a) and target.startswith(b)), f"{here} imports {target}"


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from nnunet_arseg.training.trainer import nnUNetTrainerARSeg\n")
    assert our_imports(bad) == {"nnunet_arseg.training.trainer"}
    assert layer_of("nnunet_arseg.training.trainer") > layer_of("nnunet_arseg.network")
