"""Where a trained AR-Seg model's token loss sits, scale by scale, on patients it never saw.

    python benchmarks/research/token_loss_by_scale.py -m MODEL_FOLDER -i RAW_DATASET [-f all] \
        [-chk checkpoint_final.pth]

``MODEL_FOLDER``: a trainer folder (``nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>``);
``RAW_DATASET``: an nnU-Net raw dataset with rater masks (``imagesTr/`` and ``labelsTr_raters/``, as the LIDC converter
writes them). Every non-empty rater mask of every case is tokenized and scored under teacher forcing (what the token
loss sees); per scale the script prints the share of the tokens and of the summed cross-entropy, the mean
cross-entropy and argmax accuracy, and the perplexity of the codes the masks use there (how much of the codebook a
scale needs).
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_arseg.evaluation.casefiles import rater_files_per_case
from nnunet_arseg.nnunet_ext import ensure_ext_trainer_env


def scale_table(model: str, raw: str, fold: str, checkpoint: str, device: str = "cpu") -> list[dict]:
    """One row per scale: tokens, loss share, mean CE, accuracy and code perplexity over the non-empty rater masks."""
    ensure_ext_trainer_env()
    predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(model, (fold if fold == "all" else int(fold),), checkpoint)
    net = predictor.network.eval()
    net.load_state_dict(predictor.list_of_parameters[0])
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    ending = predictor.dataset_json["file_ending"]
    lengths = net.transformer.lengths
    ce_S, hits_S = np.zeros(len(lengths)), np.zeros(len(lengths))
    counts_SV = np.zeros((len(lengths), net.tokenizer.quantizer.V))
    masks = 0
    raters = rater_files_per_case([join(raw, "labelsTr_raters")], ending, load_json(join(raw, "dataset.json")))
    for case, rater_files in raters.items():
        image = [join(raw, "imagesTr", f"{case}_0000{ending}")]
        cases = [preprocessor.run_case(image, rater, predictor.plans_manager, predictor.configuration_manager,
                                       predictor.dataset_json) for rater in rater_files]
        masks_R = torch.from_numpy(np.stack([np.asarray(seg[:, 0] > 0, dtype=np.float32) for _, seg, _ in cases]))
        masks_R = masks_R[masks_R.flatten(1).amax(1) > 0]
        if not len(masks_R):
            continue
        x = torch.from_numpy(np.asarray(cases[0][0][:, 0], dtype=np.float32))[None]
        with torch.no_grad():  # the image encoded once, its raters' masks scored as one batch
            image_enc = net.encode_image(x)
            image_enc = type(image_enc)(*[t.expand(len(masks_R), *t.shape[1:]) for t in image_enc])
            logits_BLV, target_BL = net.teacher_forced_logits(image_enc, masks_R,
                                                              torch.zeros(len(masks_R), dtype=torch.long))
            ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), target_BL, reduction="none")
        hit_BL = logits_BLV.argmax(-1) == target_BL
        for si, (ce, hit, target) in enumerate(zip(ce_BL.split(lengths, 1), hit_BL.split(lengths, 1),
                                                   target_BL.split(lengths, 1))):
            ce_S[si] += float(ce.sum())
            hits_S[si] += float(hit.sum())
            np.add.at(counts_SV[si], target.flatten().numpy(), 1)
        masks += len(masks_R)
    if masks == 0:
        raise SystemExit(f"{raw}: no non-empty rater mask found in labelsTr_raters/")
    rows = []
    for si, pn in enumerate(net.tokenizer.scales):
        used = counts_SV[si][counts_SV[si] > 0] / counts_SV[si].sum()
        rows.append({"scale": si + 1, "shape": pn, "token_share": lengths[si] / sum(lengths),
                     "loss_share": ce_S[si] / ce_S.sum(), "ce": ce_S[si] / (masks * lengths[si]),
                     "accuracy": hits_S[si] / (masks * lengths[si]),
                     "perplexity": math.exp(-(used * np.log(used)).sum()), "codes_used": len(used)})
    print(f"{masks} non-empty rater masks of {os.path.basename(raw.rstrip('/'))}; codebook of "
          f"{net.tokenizer.quantizer.V} codes")
    print("scale  shape    tokens  loss   mean CE  accuracy  perplexity  codes used")
    for r in rows:
        print(f"{r['scale']:>5}  {str(r['shape']):<8} {r['token_share']:6.1%} {r['loss_share']:6.1%} {r['ce']:8.3f} "
              f"{r['accuracy']:9.3f} {r['perplexity']:11.1f} {r['codes_used']:11d}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", required=True, help="the trainer folder of the model")
    p.add_argument("-i", required=True, help="a raw dataset folder with imagesTr/ and labelsTr_raters/")
    p.add_argument("-f", default="all", help="the fold (default: all)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="the checkpoint (default: checkpoint_final.pth)")
    args = p.parse_args()
    scale_table(args.m, args.i, args.f, args.chk)


if __name__ == "__main__":
    main()
