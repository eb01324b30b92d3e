"""The dataset's mask tokenizer: trained once per dataset, plans and configuration, stored in the results folder, and
reused by every fold and trainer variant whose tokenizer settings match.

    $nnUNet_results/DatasetXXX_Name/ARSegTokenizer__<plans>__<configuration>/tok_<hash of tokenizer_key>/
        architecture.json      the arch kwargs (latent stride included), patch size and spacing, written by the first
                               process that resolves the folder: every fold on every host builds this architecture
        tokenizer.pth          the weights, arch kwargs, patch size, spacing and summary (what the segmentor loads)
        tokenizer_latest.pth   the training state while it trains (the same command resumes from it)
        summary.json           held-out reconstruction scores, steps, fit settings, data
        progress.png
        .lock                  while one process trains it (``lease_lock``: folds on any host wait for it)

A stored tokenizer is reused when it was trained for the same widths, patch size and spacing, and as far as the
trainer's fit settings ask (their held-out target reached, or as many steps); one that falls short is trained further
from its weights. Every load compares the file's arch kwargs with the folder's ``architecture.json``.

Masks come from the preprocessed training cases (every rater where the dataset has raters), cropped to the patch
size; 1 in 20 patients (cases) is held out to measure the reconstruction target. ``nnUNet_ARSEG_TOKENIZER`` names a
``tokenizer.pth`` to use instead (e.g. one trained on another dataset with the same patch size).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, load_pickle, maybe_mkdir_p
from scipy import ndimage

from nnunet_arseg import env
from nnunet_arseg.atomic import remove_temporaries, save_json_atomic, write_atomic
from nnunet_arseg.tokenizer import MaskTokenizer
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig, fit_tokenizer, target_reached
from nnunet_arseg.training import raters
from nnunet_arseg.training.lease_lock import LockLost, create_json, exclusive

TOKENIZER_FOLDER_PREFIX = "ARSegTokenizer"
MAX_LATENT_POSITIONS = 256  # the finest token map: AR-Seg's sequence length grows with it
ARCHITECTURE_FILE = "architecture.json"
TOKENIZER_FILES = ("tokenizer.pth", "tokenizer_latest.pth", "summary.json", "progress.png")  # written under the lock


# ---------------------------------------------------------------- latent resolution from the data
def sizing_cases(identifiers, max_cases: int = 500) -> list[str]:
    """The cases the latent stride is sized from: ``max_cases`` drawn with a fixed seed from the sorted identifiers
    (nnU-Net lists them in the file system's order, which differs between copies of the same data)."""
    keys = sorted(identifiers)
    return [keys[i] for i in np.random.default_rng(0).permutation(len(keys))[:max_cases]]


def median_object_extent(seg_arrays, labels_or_regions, max_objects: int = 5000) -> tuple[float, ...]:
    """Median bounding-box extent per spatial axis of the connected foreground objects (of every class) in the
    given label maps (each (1, *spatial) or (*spatial))."""
    extents = []
    for seg in seg_arrays:
        seg = np.asarray(seg)
        seg = seg[0] if seg.ndim > 2 and seg.shape[0] == 1 else seg
        for lr in labels_or_regions:
            labelled, n = ndimage.label(np.isin(seg, np.atleast_1d(lr)))
            for sl in ndimage.find_objects(labelled):
                extents.append([s.stop - s.start for s in sl])
        if len(extents) >= max_objects:
            break
    if not extents:
        raise ValueError("no foreground object in the training labels: the tokenizer cannot be sized")
    return tuple(float(v) for v in np.median(np.asarray(extents), axis=0))


def choose_latent_stride(patch_size, object_extent, max_positions: int = MAX_LATENT_POSITIONS,
                         min_stride: int = 4, max_stride: int = 32) -> tuple[int, ...]:
    """Per-axis latent stride: the power of two nearest half the median object extent (so a typical object spans
    about two latent cells), within [min_stride, max_stride], each dividing the patch and leaving two latent cells per
    axis at least, then doubled on the axis with the most latent positions until the latent has at most
    ``max_positions`` (the finest token map bounds AR-Seg's cost, which then grows no faster than the patch)."""
    def divides(n: int, s: int) -> bool:
        return n % s == 0

    stride = []
    for n, e in zip(patch_size, object_extent):
        s = int(2 ** round(math.log2(max(e, 1.0) / 2)))
        s = min(max(s, min_stride), max_stride)
        while s > 1 and (not divides(n, s) or n // s < 2):
            s //= 2
        stride.append(s)
    while math.prod(n // s for n, s in zip(patch_size, stride)) > max_positions:
        order = sorted(range(len(stride)), key=lambda a: -patch_size[a] // stride[a])
        axis = next((a for a in order if divides(patch_size[a], 4 * stride[a]) and 2 * stride[a] <= max_stride), None)
        if axis is None:
            break
        stride[axis] *= 2
    return tuple(stride)


# ---------------------------------------------------------------- masks from a preprocessed dataset
class PreprocessedMasks:
    """Binary masks of the patch size from preprocessed nnU-Net cases: a drawn rater (where the dataset has raters)
    or the label map, a drawn foreground class/region, background outside the image."""

    def __init__(self, preprocessed_data_folder: str, identifiers: list[str], dataset_class, label_manager,
                 patch_size, with_raters: bool, foreground_fraction: float = 0.67):
        self.folder, self.identifiers = preprocessed_data_folder, sorted(identifiers)
        self.dataset = dataset_class(preprocessed_data_folder, self.identifiers)
        self.lm, self.patch = label_manager, tuple(int(n) for n in patch_size)
        self.with_raters, self.foreground_fraction = with_raters, foreground_fraction
        self.classes = list(label_manager.foreground_regions if label_manager.has_regions
                            else label_manager.foreground_labels)

    def label_maps(self, identifier: str) -> tuple[np.ndarray, dict]:
        """(R, *spatial) label maps (one per rater, or the case's one) and the case's properties."""
        if self.with_raters:
            return (raters.load_raters(self.folder, identifier)[:, 0],
                    load_pickle(join(self.folder, identifier + ".pkl")))
        _, seg, _, properties = self.dataset.load_case(identifier)
        return np.asarray(seg[:])[:1], properties

    def crop(self, label_map: np.ndarray, locations, rng: np.random.Generator, centred: bool) -> np.ndarray:
        """A patch-size crop of (*spatial), ``centred`` on one of the class ``locations`` (nnU-Net's sampled
        foreground voxels) where there are any; 2D configurations first pick a slice (the centre's, if centred)."""
        spatial = label_map.shape
        centre = None
        if centred and locations is not None and len(locations):
            centre = locations[rng.integers(len(locations))][1:]  # (c, z, y, x) -> spatial
        if len(self.patch) == 2 and len(spatial) == 3:
            z = int(centre[0]) if centre is not None else int(rng.integers(spatial[0]))
            label_map, spatial = label_map[z], spatial[1:]
            centre = None if centre is None else centre[1:]
        out = np.zeros(self.patch, dtype=label_map.dtype)
        src, dst = [], []
        for a, (n, p) in enumerate(zip(spatial, self.patch)):
            if centre is not None:
                lo = int(centre[a]) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
            else:
                lo = int(rng.integers(min(0, n - p), max(0, n - p) + 1))
            lo = min(max(lo, min(0, n - p)), max(0, n - p))
            src.append(slice(max(lo, 0), min(lo + p, n)))
            dst.append(slice(max(-lo, 0), max(-lo, 0) + min(lo + p, n) - max(lo, 0)))
        out[tuple(dst)] = label_map[tuple(src)]
        return out

    def draw(self, rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        """(B, 1, *patch) binary masks. With probability ``foreground_fraction`` an example is centred on the drawn
        class's foreground and, where raters disagree on whether there is any, drawn from a rater who marked it."""
        out = []
        for _ in range(batch_size):
            identifier = self.identifiers[rng.integers(len(self.identifiers))]
            maps, properties = self.label_maps(identifier)
            k = int(rng.integers(len(self.classes)))
            values = np.atleast_1d(self.classes[k])
            locations = properties.get("class_locations", {}).get(self.classes[k])
            if rng.random() < self.foreground_fraction:
                marked = [i for i, m in enumerate(maps) if np.isin(m, values).any()] if len(maps) > 1 else [0]
                crop = self.crop(maps[marked[rng.integers(len(marked))] if marked else 0], locations, rng, True)
            else:
                crop = self.crop(maps[rng.integers(len(maps))], locations, rng, False)
            out.append(np.isin(crop, values))
        return torch.from_numpy(np.stack(out)[:, None])


def split_heldout(identifiers: list[str], patient_of_case: dict | None, fraction: float = 0.05,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) cases: ``fraction`` of the patients (of the cases, without patients), at least one."""
    groups: dict[str, list[str]] = {}
    for k in sorted(identifiers):
        groups.setdefault((patient_of_case or {}).get(k, k), []).append(k)
    names = sorted(groups)
    if len(names) < 2:
        return list(identifiers), list(identifiers)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(names, max(1, round(fraction * len(names))), replace=False).tolist())
    return ([k for g in names if g not in held for k in groups[g]], [k for g in sorted(held) for k in groups[g]])


# ---------------------------------------------------------------- the stored tokenizer
def tokenizer_folder(results_dataset_folder: str, plans_identifier: str, configuration: str, name: str) -> str:
    return join(results_dataset_folder, f"{TOKENIZER_FOLDER_PREFIX}__{plans_identifier}__{configuration}", name)


def load_tokenizer_file(path: str) -> dict:
    """``{"arch_kwargs": ..., "state_dict": ..., "summary": ...}`` of a stored tokenizer; a clear error otherwise."""
    if not isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "arch_kwargs" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an AR-Seg tokenizer file (expected the keys 'arch_kwargs' and "
                         f"'state_dict', as written by nnUNetv2_train ... -tr nnUNetTrainerARSeg)")
    return ckpt


@dataclass(frozen=True)
class DatasetTokenizer:
    """Where the tokenizer of a dataset/plans/configuration is (or will be), the arch kwargs it has, and what it was
    resolved for (the variant's widths, the plans' patch size and spacing)."""

    path: str
    arch_kwargs: dict
    given: bool  # named by the user (nnUNet_ARSEG_TOKENIZER), never trained or written here
    key: dict | None = None

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def exists(self) -> bool:
        return isfile(self.path)


def tokenizer_key(widths: dict, patch_size, spacing) -> dict:
    """What a stored tokenizer must have been trained for to be reused: the variant's widths on masks of the plans'
    patch size and spacing (the latent stride follows from these masks)."""
    return {"widths": dict(widths), "patch_size": [int(n) for n in patch_size],
            "spacing": [float(s) for s in spacing]}


def tokenizer_name(key: dict) -> str:
    """A stable folder name for a ``tokenizer_key``: variants with equal widths share the tokenizer; re-planning
    (another patch size or spacing under the same plans name) gets another one."""
    return "tok_" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def key_mismatch(stored: dict, key: dict) -> str | None:
    """How a stored tokenizer (``tokenizer.pth`` or ``tokenizer_latest.pth``, loaded) differs from ``key``, or None."""
    arch = stored.get("arch_kwargs", {})
    wrong = [f"{k} {arch.get(k)} (asked: {v})" for k, v in key["widths"].items()
             if v is not None and json.dumps(arch.get(k)) != json.dumps(v)]
    for field in ("patch_size", "spacing"):
        if stored.get(field) is None or [float(n) for n in stored[field]] != [float(n) for n in key[field]]:
            wrong.append(f"{field.replace('_', ' ')} {stored.get(field)} (asked: {key[field]})")
    return "; ".join(wrong) or None


def architecture_mismatch(stored: dict, tok: DatasetTokenizer) -> str | None:
    """How the arch kwargs of a stored tokenizer file differ from those ``tok`` was resolved to, or None."""
    ours, theirs = tok.arch_kwargs, stored.get("arch_kwargs", {})
    wrong = [f"{k} {theirs.get(k)} (this run: {ours.get(k)})"
             for k in sorted(set(ours) | set(theirs)) if json.dumps(ours.get(k)) != json.dumps(theirs.get(k))]
    return "; ".join(wrong) or None


def load_stored(tok: DatasetTokenizer) -> dict:
    """``tok``'s ``tokenizer.pth``, refused with a clear error when its architecture is not the one ``tok`` (and so
    the network) was built for."""
    stored = load_tokenizer_file(tok.path)
    wrong = None if tok.given else architecture_mismatch(stored, tok)
    if wrong is not None:
        raise ValueError(f"{tok.path} has another architecture than this run builds: {wrong}. This run was set up "
                         f"before the file was stored or its folder's {ARCHITECTURE_FILE} written (e.g. by an older "
                         f"version, from another copy of the preprocessed data): run the same command again, it then "
                         f"builds the stored architecture")
    return stored


def shortfall(summary: dict, fit_cfg: TokenizerFitConfig) -> str | None:
    """Why a stored tokenizer falls short of ``fit_cfg`` (its training would not have stopped yet), or None."""
    last = summary["history"][-1] if summary.get("history") else summary["heldout"]
    if target_reached(last, fit_cfg) or summary["steps"] >= fit_cfg.max_steps:
        return None
    return (f"it was trained {summary['steps']} steps to held-out Dice {last['dice_nonempty']:.4f}, empty kept "
            f"{last['empty_kept']:.3f}; this trainer asks for Dice {fit_cfg.target_dice}, empty kept "
            f"{fit_cfg.target_empty} within {fit_cfg.max_steps} steps")


def why_train(tok: DatasetTokenizer, fit_cfg: TokenizerFitConfig) -> str | None:
    """Why ``tok`` must be trained (it does not exist, or falls short of ``fit_cfg``), or None when it is ready."""
    if tok.given:
        return None
    if not tok.exists():
        return "there is none yet"
    summary = load_tokenizer_file(tok.path).get("summary")  # none: written by hand, taken as it is
    reason = None if summary is None else shortfall(summary, fit_cfg)
    return None if reason is None else f"the stored one falls short: {reason}"


def resolve_dataset_tokenizer(results_dataset_folder: str, plans_identifier: str, configuration: str, patch_size,
                              spacing, widths: dict, object_extent: Callable[[], tuple[float, ...]]
                              ) -> DatasetTokenizer:
    """The tokenizer a trainer uses: the user's (``nnUNet_ARSEG_TOKENIZER``), else the dataset's for these widths,
    patch size and spacing, of the architecture its folder records (``architecture.json``, checked against the stored
    file). The first process to resolve a folder writes that record: the stored tokenizer's architecture, or a new
    one whose latent stride follows the data (``choose_latent_stride`` of ``object_extent()``; only called then, since
    it reads the preprocessed labels), so hosts whose copies of the data differ still build one architecture."""
    given = env.tokenizer_file()
    if given is not None:
        ckpt = load_tokenizer_file(given)
        if tuple(ckpt.get("patch_size", ())) != tuple(patch_size):
            raise ValueError(f"{env.TOKENIZER}={given} is a tokenizer for the patch size {ckpt.get('patch_size')}, "
                             f"but this configuration's patch size is {list(patch_size)}; train one for it (unset "
                             f"{env.TOKENIZER}) or use a configuration with that patch size")
        return DatasetTokenizer(given, ckpt["arch_kwargs"], True)
    key = tokenizer_key(widths, patch_size, spacing)
    folder = tokenizer_folder(results_dataset_folder, plans_identifier, configuration, tokenizer_name(key))
    path, stored, stored_name = join(folder, "tokenizer.pth"), None, None
    for name in ("tokenizer.pth", "tokenizer_latest.pth"):  # a stored one, else the one that was training
        if isfile(join(folder, name)):
            candidate = torch.load(join(folder, name), map_location="cpu", weights_only=False)
            wrong = key_mismatch(candidate, key)
            if wrong is None:
                stored, stored_name = candidate, name
                break
            if name == "tokenizer.pth":
                raise ValueError(f"{join(folder, name)} was not trained for this trainer's tokenizer settings: "
                                 f"{wrong}. Move the folder {folder} away (this trainer then trains its own) or name a "
                                 f"fitting tokenizer with {env.TOKENIZER}")
    record = join(folder, ARCHITECTURE_FILE)
    if not isfile(record):  # the first process to get here sizes the architecture for all (of its copy of the data)
        kwargs = stored["arch_kwargs"] if stored is not None else dict(widths)
        if kwargs.get("latent_stride") is None:
            kwargs["latent_stride"] = list(choose_latent_stride(tuple(patch_size), object_extent()))
        maybe_mkdir_p(folder)
        create_json(record, {"arch_kwargs": kwargs, **key})
    recorded = load_json(record)
    wrong = key_mismatch(recorded, key)
    if wrong is not None:
        raise ValueError(f"{record} was not written for this trainer's tokenizer settings: {wrong}. Move the folder "
                         f"{folder} away (this trainer then trains its own) or name a fitting tokenizer with "
                         f"{env.TOKENIZER}")
    tok = DatasetTokenizer(path, recorded["arch_kwargs"], False, key)
    if stored_name == "tokenizer.pth":
        load_stored(tok)  # its architecture checked against the record
    return tok


def train_dataset_tokenizer(tok: DatasetTokenizer, patch_size, train_masks: PreprocessedMasks,
                            heldout_masks: PreprocessedMasks, fit_cfg: TokenizerFitConfig, device: torch.device,
                            num_heldout: int = 512, log=print) -> dict:
    """Train the tokenizer of ``tok`` and write ``tokenizer.pth``, its summary and curve; returns the stored dict.
    Resumes ``tokenizer_latest.pth``; a stored tokenizer that falls short of ``fit_cfg`` is trained further from its
    weights; one that exists and fits (trained meanwhile by another fold) is loaded."""
    if why_train(tok, fit_cfg) is None:
        return load_stored(tok)
    maybe_mkdir_p(tok.folder)
    with exclusive(join(tok.folder, ".lock"), log=log) as hold:
        try:
            return _train_holding(hold, tok, patch_size, train_masks, heldout_masks, fit_cfg, device, num_heldout, log)
        except LockLost as lost:
            raise LockLost(f"AR-Seg: {lost}. This process stopped training the tokenizer without writing it: it was "
                           f"suspended or made no progress for longer than {env.LOCK_TIMEOUT_MINUTES} "
                           f"({hold.timeout_s / 60:g} min), and another process took the training over. Run the "
                           f"same command again: it waits for that tokenizer and uses it") from None


def _train_holding(hold, tok: DatasetTokenizer, patch_size, train_masks: PreprocessedMasks,
                   heldout_masks: PreprocessedMasks, fit_cfg: TokenizerFitConfig, device: torch.device,
                   num_heldout: int, log) -> dict:
    """``train_dataset_tokenizer``'s work under the lock ``hold``, which is checked before every write."""
    reason = why_train(tok, fit_cfg)
    if reason is None:
        return load_stored(tok)
    stray = remove_temporaries(tok.folder, TOKENIZER_FILES)  # of a killed holder: only the holder writes these
    if stray:
        log(f"removed {len(stray)} unfinished file(s) of an interrupted run from {tok.folder}: {', '.join(stray)}")
    torch.manual_seed(fit_cfg.seed)
    model = MaskTokenizer(len(patch_size), patch_size, **tok.arch_kwargs).to(device)
    heldout = heldout_masks.draw(np.random.default_rng(fit_cfg.seed + 1), num_heldout)
    hold.progress()
    latest = join(tok.folder, "tokenizer_latest.pth")
    # on the CPU whatever the device: the random generators' states must be CPU tensors
    state = torch.load(latest, map_location="cpu", weights_only=False) if isfile(latest) else None
    wrong = None if state is None else key_mismatch(state, tok.key) or architecture_mismatch(state, tok)
    if wrong is not None:
        log(f"{latest} was trained for other settings ({wrong}): not resumed")
        state = None
    if state is None and tok.exists():
        stored = load_stored(tok)
        state = {"model": stored["state_dict"], "step": stored["summary"]["steps"],
                 "history": stored["summary"]["history"], "seconds": stored["summary"]["seconds"]}
    log(f"Training the dataset's mask tokenizer ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, latent {model.latent_shape}, scales {model.scales}) on {len(train_masks.identifiers)} cases "
        f"until held-out Dice >= {fit_cfg.target_dice} or {fit_cfg.max_steps} steps, because {reason}"
        + (f"; resuming at step {state['step']}" if state else ""))
    started = time.time()
    seconds_before = state.get("seconds", 0.0) if state else 0.0

    def checkpoint(st: dict) -> None:
        st.update(seconds=seconds_before + time.time() - started, arch_kwargs=tok.arch_kwargs,
                  patch_size=tok.key["patch_size"], spacing=tok.key["spacing"])
        hold.check()
        write_atomic(latest, lambda t: torch.save(st, t))

    state = fit_tokenizer(model, train_masks.draw, heldout, fit_cfg, state, checkpoint, log, on_step=hold.progress)
    final = state["history"][-1]
    summary = {"arch_kwargs": tok.arch_kwargs, "patch_size": list(patch_size), "spacing": tok.key["spacing"],
               "latent_shape": list(model.latent_shape), "scales": [list(pn) for pn in model.scales],
               "steps": state["step"],
               "seconds": round(state.get("seconds", seconds_before + time.time() - started), 1),
               "target_reached": target_reached(final, fit_cfg), "heldout": final,
               "num_train_cases": len(train_masks.identifiers),
               "num_heldout_cases": len(heldout_masks.identifiers), "fit_config": fit_cfg.to_dict(),
               "history": state["history"]}
    stored = {"arch_kwargs": tok.arch_kwargs, "patch_size": list(patch_size), "spacing": tok.key["spacing"],
              "state_dict": model.state_dict(), "summary": summary}
    hold.check()
    save_json_atomic(summary, join(tok.folder, "summary.json"))
    plot_history(state["history"], join(tok.folder, "progress.png"))
    hold.check()
    write_atomic(tok.path, lambda t: torch.save(stored, t))  # last: a kill before it resumes from latest
    if isfile(latest):
        os.remove(latest)
    log(f"Tokenizer stored at {tok.path}: held-out Dice {final['dice_nonempty']:.4f}, empty kept "
        f"{final['empty_kept']:.3f} after {state['step']} steps ({summary['seconds'] / 60:.1f} min)")
    return stored


def check_checkpoint_tokenizer(checkpoint: dict, tok: DatasetTokenizer, network_tokenizer: torch.nn.Module) -> None:
    """``--c``: refuse, with what to do instead, a checkpoint trained with a tokenizer of another architecture than
    the one this run built its network for (the dataset's tokenizer was re-planned or retrained since)."""
    trained_with = checkpoint.get("arseg_tokenizer")
    ours = {k: tuple(v.shape) for k, v in network_tokenizer.state_dict().items()}
    theirs = {k.removeprefix("module.").removeprefix("tokenizer."): tuple(v.shape)
              for k, v in checkpoint["network_weights"].items() if k.removeprefix("module.").startswith("tokenizer.")}
    differs = ours != theirs
    if not differs and trained_with not in (None, tok.path) and isfile(trained_with):
        differs = load_tokenizer_file(trained_with)["arch_kwargs"] != tok.arch_kwargs
    if differs:
        remedy = (f"continue it with that tokenizer ({env.TOKENIZER}={trained_with} nnUNetv2_train ... --c) or train "
                  f"the fold anew (without --c)" if trained_with and isfile(trained_with)
                  else "train the fold anew (without --c)")
        raise RuntimeError(f"this fold's checkpoint was trained with the tokenizer {trained_with}, whose architecture "
                           f"differs from that of {tok.path}, which this run uses: {remedy}")


def plot_history(history: list[dict], path: str) -> None:
    """Held-out reconstruction Dice and training loss against steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["dice_nonempty"] for h in history], "b-o", label="held-out Dice (non-empty masks)")
    ax.plot(steps, [h["empty_kept"] for h in history], "g--", label="empty masks kept empty")
    ax.set_xlabel("step"), ax.set_ylim(0, 1.01), ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["loss"] for h in history], "r:", label="training loss")
    ax2.set_ylabel("loss")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda t: fig.savefig(t, dpi=100, format="png"))
    plt.close(fig)
