"""Train the mask tokenizer on LIDC crops for M minutes, then measure how well it reconstructs held-out masks.

    python benchmarks/tokenizer_reconstruction.py --train DIR --test DIR --minutes 10 [--seed 0] [--device cpu]

``--train``/``--test``: a folder of ``LIDC-IDRI-XXXX`` patient folders (the layout of ``../shared/data/lidc``),
optionally with ``--train_list``/``--test_list`` (text files, one patient id per line) to use only those patients.
Progress goes to stderr; one JSON line with the results goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

from dataset_conversion.lidc import find_lidc_slices
from nnunet_arseg.tokenizer import MaskTokenizer


def read_mask(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 0


def rater_masks(root: str, patient_list: str | None) -> list[tuple]:
    """All slices below ``root`` (of the listed patients): a tuple of rater-mask paths per slice."""
    keep = None if patient_list is None else {ln.strip() for ln in open(patient_list) if ln.strip()}
    slices = [s for s in find_lidc_slices(root) if keep is None or s.patient in keep]
    if not slices:
        raise SystemExit(f"no LIDC slices (LIDC-IDRI-XXXX/nodule-K/images/slice-N.png) found below {root}")
    return slices


def augment(mask_B1hw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (the dihedral group; exact on the pixel grid), one draw per example."""
    out = []
    for m, code in zip(mask_B1hw, torch.randint(0, 8, (len(mask_B1hw),), generator=gen).tolist()):
        m = torch.rot90(m, code % 4, dims=(1, 2))
        out.append(m.flip(2) if code >= 4 else m)
    return torch.stack(out)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))


@torch.no_grad()
def evaluate(model: MaskTokenizer, slices, device: str, batch_size: int) -> dict:
    """Dice per non-empty mask (all raters of every slice) and the fraction of empty masks decoded empty.

    Identical masks (most are empty) are decoded once and counted as often as they occur.
    """
    counts: Counter = Counter()
    arrays = {}
    for s in slices:
        for path in s.rater_masks:
            m = read_mask(path)
            key = np.packbits(m).tobytes()
            counts[key] += 1
            arrays.setdefault(key, m)
    keys = list(arrays)
    dices, empty_ok, num_empty = [], 0, 0
    model.eval()
    for i in range(0, len(keys), batch_size):
        chunk = keys[i:i + batch_size]
        x = torch.from_numpy(np.stack([arrays[k] for k in chunk])[:, None]).float().to(device)
        pred = (model.idx_to_logits(model.mask_to_idx(x)) > 0).cpu().numpy()[:, 0]
        for k, p in zip(chunk, pred):
            gt = arrays[k]
            if gt.any():
                dices += [dice(p, gt)] * counts[k]
            else:
                num_empty += counts[k]
                empty_ok += counts[k] * int(not p.any())
    return {"dice_nonempty": float(np.mean(dices)), "dice_nonempty_median": float(np.median(dices)),
            "num_nonempty_masks": len(dices), "num_empty_masks": num_empty,
            "empty_reconstructed_empty": empty_ok / max(num_empty, 1), "num_unique_masks": len(keys)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--train_list")
    ap.add_argument("--test_list")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ch", type=int, default=16)
    ap.add_argument("--dead_code_steps", type=int, default=20)
    ap.add_argument("--no_augment", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--eval_every", type=float, default=0, help="also evaluate every this many training minutes "
                    "(one JSON line on stderr each; evaluation time is not counted as training time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train, test = rater_masks(args.train, args.train_list), rater_masks(args.test, args.test_list)
    overlap = {s.patient for s in train} & {s.patient for s in test}
    if overlap:
        raise SystemExit(f"train and test share patients {sorted(overlap)[:5]}...; split by patient")
    print(f"train: {len(train)} slices of {len({s.patient for s in train})} patients, test: {len(test)} slices of "
          f"{len({s.patient for s in test})} patients", file=sys.stderr)

    model = MaskTokenizer(torch.nn.Conv2d, (128, 128), ch=args.ch, dead_code_steps=args.dead_code_steps).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    start, it, logs, paused = time.time(), 0, {}, 0.0
    next_eval = args.eval_every or float("inf")
    while time.time() - start - paused < args.minutes * 60:
        if time.time() - start - paused >= next_eval * 60:
            t_eval = time.time()
            print(json.dumps({"train_minutes": next_eval, "train_iterations": it,
                              **evaluate(model, test, args.device, batch_size=32)}), file=sys.stderr)
            next_eval += args.eval_every
            paused += time.time() - t_eval
        model.train()
        picks = torch.randint(0, len(train), (args.batch_size,), generator=gen).tolist()
        raters = torch.randint(0, 4, (args.batch_size,), generator=gen).tolist()
        x = torch.from_numpy(np.stack([read_mask(train[p].rater_masks[r]) for p, r in zip(picks, raters)])[:, None])
        x = x.float() if args.no_augment else augment(x.float(), gen)
        loss, logs = model.loss(x.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % 10 == 0:
            print(f"it {it} {time.time() - start - paused:.0f}s loss {logs['loss']:.4f} dice_loss {logs['dice_loss']:.4f} "
                  f"vq {logs['vq']:.4f} usage_ema {[round(u, 3) for u in logs['usage_ema']]}", file=sys.stderr)
    train_minutes = (time.time() - start - paused) / 60
    t_eval = time.time()
    result = evaluate(model, test, args.device, batch_size=32)
    result.update({
        "train_iterations": it, "train_minutes": round(train_minutes, 2),
        "eval_minutes": round((time.time() - t_eval) / 60, 2), "batch_size": args.batch_size, "threads": args.threads,
        "lr": args.lr, "ch": args.ch, "seed": args.seed, "device": args.device,
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_slices": len(train), "train_patients": len({s.patient for s in train}),
        "test_slices": len(test), "test_patients": len({s.patient for s in test}),
        "codebook_usage_ema_per_scale": [round(u, 4) for u in model.quantizer.ema_usage().tolist()],
        "codebook_usage_last_batch_per_scale": [round(u, 4) for u in logs.get("usage_batch", [])],
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
