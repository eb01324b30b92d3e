"""Real AR-Seg models for the prediction tests, built without any trainer.

nnU-Net plans a raw dataset made of real LIDC crops from the bundled sample; the network the plans name is overfit
in-process on the four raters' masks of the preprocessed crops (so it draws non-empty masks that disagree where the
raters do); its weights go into an nnU-Net results folder (``plans.json``, ``dataset.json``,
``fold_0/checkpoint_final.pth``), which both predict commands load like any trained model.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from PIL import Image

import nnunet_arseg
from nnunet_arseg.network import build_arseg_architecture
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig, fit_tokenizer, target_reached

DEMO = Path(nnunet_arseg.__file__).parent / "demo_data" / "lidc"
TRAINER = "nnUNetTrainerARSeg"
SMALL_TOKENIZER = {"ch": 8, "num_res_blocks": 1, "z_channels": 16, "codebook_size": 64, "code_dim": 8,
                   "space_to_depth": 2, "latent_stride": 8}
SMALL_TRANSFORMER = {"width": 64, "depth": 2, "heads": 4, "dropout": 0.0}


def lidc_crops(count: int, size: int = 64) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image (size, size) uint8, raters (4, size, size) bool)`` of the first ``count`` bundled slices where
    three raters mark the nodule and the fourth draws nothing (centre crops): whether to draw a mask at all is
    ambiguous, so a model fit to the raters draws samples that disagree."""
    out = []
    for nodule in sorted(DEMO.glob("LIDC-IDRI-*/nodule-*")):
        for image_file in sorted(nodule.glob("images/slice-*.png"), key=lambda p: int(p.stem.split("-")[1])):
            raters = np.stack([np.asarray(Image.open(nodule / f"mask-{r}" / image_file.name)) > 0 for r in range(4)])
            lo = (raters.shape[1] - size) // 2
            raters = raters[:, lo:lo + size, lo:lo + size]
            marked = raters.reshape(4, -1).sum(1)
            if (marked > 10).sum() == 3 and (marked == 0).sum() == 1:
                image = np.asarray(Image.open(image_file))[lo:lo + size, lo:lo + size]
                name = f"{nodule.parent.name[-4:]}_{nodule.name.split('-')[1]}_{image_file.stem[6:]}"
                out.append((name, image, raters))
                break
        if len(out) == count:
            return out
    raise RuntimeError(f"the bundled sample has fewer than {count} slices where exactly one rater draws nothing")


@contextmanager
def nnunet_paths(root: Path):
    """``nnUNet_raw``/``_preprocessed``/``_results`` under ``root`` for the code run inside (nnU-Net reads them at
    call time)."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    before = {k: os.environ.get(k) for k in keys}
    for k in keys:
        (root / k).mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(root / k)
    try:
        yield {k: str(root / k) for k in keys}
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan(dataset_id: int) -> dict:
    """nnU-Net's fingerprint and default plans of a raw dataset (in this process)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    extract_fingerprint_dataset(dataset_id, num_processes=1, verbose=False, show_progress_bar=False)
    _, plans_identifier = plan_experiment_dataset(dataset_id)
    return load_json(os.path.join(nnUNet_preprocessed.get(), convert_id_to_dataset_name(dataset_id),
                                  f"{plans_identifier}.json"))


def with_arseg(plans: dict, configuration: str, patch_size=None, n_stages: int | None = None, **arseg) -> dict:
    """``plans`` whose ``configuration`` uses a small ARSegNetwork (optionally with another patch size and a U-Net
    encoder of ``n_stages`` stages, strides 2, at most 64 features)."""
    cfg = plans["configurations"][configuration]
    stock = cfg["architecture"]
    kw = stock["arch_kwargs"]
    if patch_size is not None:
        cfg["patch_size"] = list(patch_size)
    if n_stages is not None:
        dims = len(cfg["patch_size"])
        kw.update(n_stages=n_stages, kernel_sizes=[[3] * dims] * n_stages,
                  strides=[[1] * dims] + [[2] * dims] * (n_stages - 1), n_conv_per_stage=[1] * n_stages,
                  n_conv_per_stage_decoder=[1] * (n_stages - 1), features_per_stage=kw["features_per_stage"][:n_stages])
    kw["features_per_stage"] = [min(int(f), 64) for f in kw["features_per_stage"]]
    cfg["architecture"] = build_arseg_architecture(stock, cfg["patch_size"], preset_name="tiny", **{
        "tokenizer": SMALL_TOKENIZER, "transformer": SMALL_TRANSFORMER, "num_prefix_tokens": 16,
        # all 64 codes, a prefix from the encoder without the dense head, no presence head (every sample a token
        # draw): the briefly overfit fixture must stay diverse where its raters disagree, and draw masks of both
        # values with a few samples (the presence head is tested in test_network and end to end in test_e2e_nnunet)
        "top_k": 0, "prefix_source": "encoder", "aux_head": False, "presence": False, **arseg})
    return plans


def build_network(plans: dict, configuration: str, dataset_json: dict, seed: int = 0):
    """The network the plans name, initialised from ``seed``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    torch.manual_seed(seed)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import,
                                  determine_num_input_channels(pm, cm, dataset_json),
                                  pm.get_label_manager(dataset_json).num_segmentation_heads, allow_init=True,
                                  deep_supervision=None)


def preprocessed_tiles(plans: dict, configuration: str, dataset_json: dict, cases) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """The network inputs ``(B, C, *patch)`` of single-tile cases, preprocessed as nnU-Net's predictor does, and
    their rater masks ``(B, R, *patch)``; ``cases``: ``(image files, rater files)`` pairs."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    pre = DefaultPreprocessor(verbose=False)
    xs, ms = [], []
    def tile(arr):  # a 2D configuration sees the one slice of a 2D image
        arr = arr[:, 0] if len(cm.patch_size) == arr.ndim - 2 and arr.shape[1] == 1 else arr
        arr = pad_nd_image(arr, cm.patch_size, "constant", {"value": 0})
        assert arr.shape[1:] == tuple(cm.patch_size), "the tests' cases are single tiles"
        return torch.from_numpy(arr)

    for images, rater_files in cases:
        per_rater = [pre.run_case(images, r, pm, cm, dataset_json) for r in rater_files]
        xs.append(tile(per_rater[0][0]))
        ms.append(torch.cat([tile((seg > 0).astype(np.float32)) for _, seg, _ in per_rater]))
    return torch.stack(xs), torch.stack(ms)


def draws_disagreeing_masks(network, x: torch.Tensor) -> bool:
    """What the prediction tests need of the model: most of its samples mark something, and they disagree (in at
    least two of the cases)."""
    samples = network.sample(x, 16, seed=0)["samples"][:, 0]
    marked = samples.flatten(2).any(-1).float().mean()
    disagreeing = (samples != samples[:, :1]).flatten(1).any(1).sum()
    return bool(marked >= 0.5 and disagreeing >= 2)


def overfit(network, x: torch.Tensor, masks: torch.Tensor, segmentor_steps: int = 60, max_segmentor_steps: int = 600,
            seed: int = 0):
    """Tokenizer, then segmentor, on the masks of randomly drawn raters (class 0), each to a criterion under a step
    cap (another CPU's arithmetic changes how many steps that takes, not whether the model gets there): the tokenizer
    until it reconstructs the rater masks, the segmentor at least ``segmentor_steps`` and until it draws disagreeing
    masks (checked every 20 steps)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = network.train()
    rows = torch.arange(len(x))

    def draw():
        return masks[rows, torch.randint(masks.shape[1], (len(x),), generator=gen)][:, None]

    all_masks = masks.reshape(-1, 1, *masks.shape[2:])
    cfg = TokenizerFitConfig(max_steps=1500, batch_size=8, lr=5e-3, warmup_steps=20, eval_every=25, target_dice=0.9,
                             target_empty=1.0, seed=seed)
    net.tokenizer.requires_grad_(True)
    state = fit_tokenizer(net.tokenizer, lambda rng, b: all_masks[rng.integers(len(all_masks), size=b)], all_masks,
                          cfg, log=lambda _: None)
    net.tokenizer.requires_grad_(False)
    if not target_reached(state["history"][-1], cfg):
        raise RuntimeError(f"the test model's tokenizer does not reconstruct the rater masks: {state['history'][-1]}")
    net.train()
    opt = torch.optim.AdamW(net.trainable_parameters(), 2e-3)
    cls = torch.zeros(len(x), dtype=torch.long)
    for step in range(1, max_segmentor_steps + 1):
        loss = net(x, mask=draw(), cls=cls)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= segmentor_steps and step % 20 == 0 and draws_disagreeing_masks(net, x):
            return net.eval()
    raise RuntimeError(f"the test model does not draw disagreeing masks after {max_segmentor_steps} steps")


def save_results_folder(results_root: str, dataset_name: str, plans: dict, dataset_json: dict, configuration: str,
                        network, mirror_axes=None, fold: int = 0) -> Path:
    """``nnUNet_results/<dataset>/nnUNetTrainerARSeg__<plans>__<configuration>`` with ``network``'s weights."""
    folder = Path(results_root) / dataset_name / f"{TRAINER}__{plans['plans_name']}__{configuration}"
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    save_json(plans, str(folder / "plans.json"), sort_keys=False)
    save_json(dataset_json, str(folder / "dataset.json"), sort_keys=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": TRAINER,
                "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                              "dataset_json": dataset_json},
                "inference_allowed_mirroring_axes": mirror_axes, "current_epoch": 0},
               folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def lidc_2d_model(root: Path, dataset_id: int = 971, num_cases: int = 4) -> dict:
    """A 2D LIDC model (single-tile 64x64 cases, mirroring allowed on both axes) and its inputs: returns
    ``{"paths", "dataset", "model", "images" (the input folder), "cases", "raters"}``."""
    name = f"Dataset{dataset_id}_LIDCSample"
    crops = lidc_crops(num_cases)
    with nnunet_paths(root) as paths:
        raw = Path(paths["nnUNet_raw"]) / name
        for case, image, raters in crops:
            write_png(raw / "imagesTr" / f"{case}_0000.png", image)
            write_png(raw / "imagesTs" / f"{case}_0000.png", image)
            write_png(raw / "labelsTr" / f"{case}.png", (raters.sum(0) > 2).astype(np.uint8))
            for r, mask in enumerate(raters):
                write_png(raw / "labelsTr_raters" / f"{case}_r{r}.png", mask.astype(np.uint8))
        dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1},
                        "numTraining": len(crops), "file_ending": ".png"}
        save_json(dataset_json, str(raw / "dataset.json"), sort_keys=False)
        plans = with_arseg(plan(dataset_id), "2d", num_samples=8)
        net = build_network(plans, "2d", dataset_json)
        x, masks = preprocessed_tiles(plans, "2d", dataset_json, [
            ([str(raw / "imagesTr" / f"{case}_0000.png")],
             [str(raw / "labelsTr_raters" / f"{case}_r{r}.png") for r in range(4)]) for case, _, _ in crops])
        overfit(net, x, masks)
        model = save_results_folder(paths["nnUNet_results"], name, plans, dataset_json, "2d", net,
                                    mirror_axes=(0, 1))
    return {"paths": paths, "dataset": name, "dataset_id": dataset_id, "model": model, "images": raw / "imagesTs",
            "cases": [c for c, _, _ in crops], "raters": {c: r for c, _, r in crops}}


def lidc_volume(nodule: str = "LIDC-IDRI-0002/nodule-0", depth: int = 20, size: int = 48) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """A real CT sub-volume (depth, size, size) uint8 from the consecutive slices of one bundled nodule (centre crop)
    and the union of its raters' masks."""
    folder = DEMO / nodule
    files = sorted(folder.glob("images/slice-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    first = (len(files) - depth) // 2
    files = files[first:first + depth]
    image = np.stack([np.asarray(Image.open(f)) for f in files])
    votes = np.stack([np.stack([np.asarray(Image.open(folder / f"mask-{r}" / f.name)) > 0 for f in files])
                      for r in range(4)]).sum(0)
    lo = (image.shape[1] - size) // 2
    return image[:, lo:lo + size, lo:lo + size], (votes[:, lo:lo + size, lo:lo + size] > 0).astype(np.uint8)


def lidc_3d_model(root: Path, dataset_id: int = 972) -> dict:
    """A 3d_fullres model (patch 16x32x32: 8 tiles on the 20x48x48 case; mirroring allowed on all axes; random
    weights, which draw masks of both values: the agreement checks need no training) and its input folder with one
    real CT sub-volume."""
    import SimpleITK as sitk
    name = f"Dataset{dataset_id}_LIDCVolume"
    image, label = lidc_volume()
    with nnunet_paths(root) as paths:
        raw = Path(paths["nnUNet_raw"]) / name
        for sub in ("imagesTr", "imagesTs", "labelsTr"):
            (raw / sub).mkdir(parents=True, exist_ok=True)
        for arr, path in ((image.astype(np.int16), raw / "imagesTr" / "vol0_0000.nii.gz"),
                          (image.astype(np.int16), raw / "imagesTs" / "vol0_0000.nii.gz"),
                          (label, raw / "labelsTr" / "vol0.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
        dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1}, "numTraining": 1,
                        "file_ending": ".nii.gz"}
        save_json(dataset_json, str(raw / "dataset.json"), sort_keys=False)
        plans = with_arseg(plan(dataset_id), "3d_fullres", patch_size=(16, 32, 32), n_stages=4, num_samples=2)
        net = build_network(plans, "3d_fullres", dataset_json)
        model = save_results_folder(paths["nnUNet_results"], name, plans, dataset_json, "3d_fullres", net,
                                    mirror_axes=(0, 1, 2))
    return {"paths": paths, "dataset": name, "dataset_id": dataset_id, "model": model, "images": raw / "imagesTs",
            "shape": image.shape}
