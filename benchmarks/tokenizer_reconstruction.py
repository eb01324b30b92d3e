"""Train the dataset tokenizer as ``nnUNetTrainerARSeg_small`` would, on LIDC crops, for at most M minutes, then
measure how well it reconstructs the masks of held-out patients.

    python benchmarks/tokenizer_reconstruction.py --data DIR --test_patients 40 --minutes 15 --threads 2

``--data``: a folder of ``LIDC-IDRI-XXXX`` patient folders (the LIDC-IDRI-slices layout, e.g. the extracted LIDC dev
set). ``--test_patients`` of them (drawn with ``--seed``) are held out; the rest train. Widths are a preset's
(``--preset small`` by default), the latent stride comes from the training masks' median object extent as in the
trainer (``choose_latent_stride``), training stops at Dice >= ``--target`` on the held-out masks (checked every
``--eval_every`` steps), at ``--max_steps`` or after ``--minutes``. Every rater mask of the held-out slices is scored.
Progress goes to stderr; one JSON line with the results to stdout.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

from dataset_conversion.lidc import find_lidc_slices
from nnunet_arseg.config import PRESETS
from nnunet_arseg.tokenizer import MaskTokenizer
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig, fit_tokenizer, reconstruction_scores
from nnunet_arseg.training.tokenizer_store import choose_latent_stride, median_object_extent


def rater_stack(slices) -> np.ndarray:
    """(S * R, H, W) bool: every rater mask of the slices."""
    return np.stack([np.asarray(Image.open(p).convert("L")) > 0 for s in slices for p in s.rater_masks])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--test_patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max_steps", type=int, default=TokenizerFitConfig.max_steps)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--batch_size", type=int, default=TokenizerFitConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TokenizerFitConfig.lr)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    slices = find_lidc_slices(args.data)
    patients = sorted({s.patient for s in slices})
    test = set(random.Random(args.seed).sample(patients, args.test_patients))
    train_masks = rater_stack([s for s in slices if s.patient not in test])
    test_masks = rater_stack([s for s in slices if s.patient in test])
    print(f"train: {len(patients) - len(test)} patients, {len(train_masks)} rater masks; held out: {len(test)} "
          f"patients, {len(test_masks)} rater masks", file=sys.stderr)

    patch = train_masks.shape[1:]
    extent = median_object_extent(train_masks[:4000, None], [True])
    widths = PRESETS[args.preset].tokenizer
    stride = choose_latent_stride(patch, extent)
    torch.manual_seed(args.seed)
    model = MaskTokenizer(2, patch, **widths, latent_stride=stride).to(args.device)
    print(f"median object extent {extent}: latent stride {stride}, latent {model.latent_shape}, scales "
          f"{model.scales}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", file=sys.stderr)
    cfg = TokenizerFitConfig(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                             eval_every=args.eval_every, target_dice=args.target, seed=args.seed)
    train_t = torch.from_numpy(train_masks[:, None])
    # the held-out check during training uses a fixed subset; the final score uses every held-out mask
    check = torch.from_numpy(test_masks[np.random.default_rng(args.seed).permutation(len(test_masks))[:512], None])
    started = time.time()
    state = fit_tokenizer(model, lambda rng, b: train_t[rng.integers(len(train_t), size=b)], check, cfg,
                          log=lambda msg: print(f"[{(time.time() - started) / 60:5.1f} min] {msg}", file=sys.stderr),
                          time_limit_s=60 * args.minutes)
    train_minutes = (time.time() - started) / 60
    final = reconstruction_scores(model, torch.from_numpy(test_masks[:, None]))
    print(json.dumps({
        **final, "steps": state["step"], "train_minutes": round(train_minutes, 2), "target": args.target,
        "target_reached": final["dice_nonempty"] >= args.target and final["empty_kept"] >= cfg.target_empty,
        "latent_stride": list(stride), "latent_shape": list(model.latent_shape),
        "scales": [list(pn) for pn in model.scales], "preset": args.preset, "widths": widths,
        "num_params": sum(p.numel() for p in model.parameters()), "threads": args.threads, "device": args.device,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "train_patients": len(patients) - len(test), "test_patients": len(test),
        "history": state["history"]}))


if __name__ == "__main__":
    main()
