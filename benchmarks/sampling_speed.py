"""Seconds per image of AR-Seg sampling N masks against nnU-Net's stock prediction, measured in one run.

    python benchmarks/sampling_speed.py [-n 1 16] [--threads 1 2] [--rounds 3] [--preset small]
                                        [--brats BRATS_FOLDER] [-device cpu]

Both networks are built from the same plans, as a lab would train them: nnU-Net's U-Net with its default mirroring
test-time augmentation, AR-Seg at a preset's size (``small``, what the README recommends on a CPU) without it. Both
predict the same real case through nnU-Net's own ``predict_sliding_window_return_logits``: a 128x128 LIDC crop of
the bundled sample (2d) and, with ``--brats`` (a folder of BRATS 2013/2015 cases in their original layout), a whole
BRATS case cropped to 96x96x64 around the tumour in 3d_fullres (the plans' patch then covers the crop: one window,
the ``tiles`` column). Timing does not depend on the weights (the number of steps is fixed), so untrained networks
are timed.

Where the case is one patch, AR-Seg's time is also split into the image encoder, the token sampling and the
decoding (one extra draw, timed by stage). Every (configuration, threads) runs in a fresh process, and all of them
run one after the other ``--rounds`` times (A, B, C, A, B, C, ...), so a change of load on a shared machine moves
every configuration. Reported per configuration: the minimum and median seconds per image over the rounds, and the
ratios of minima against nnU-Net and against AR-Seg's N = 1 at the same thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from nnunet_arseg.demo import demo_data_dir

LIDC_ID, BRATS_ID = 989, 988


def _run(cmd: list[str], env: dict) -> None:
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prepare(workdir: str, brats: str | None) -> dict[str, str]:
    """Convert and plan the cases; returns ``{configuration: preprocessed dataset folder}``."""
    env = dict(os.environ, nnUNet_raw=f"{workdir}/raw", nnUNet_preprocessed=f"{workdir}/pre",
               nnUNet_results=f"{workdir}/res", nnUNet_def_n_proc="1")
    bin_dir = os.path.dirname(sys.executable)
    _run([f"{bin_dir}/nnUNetv2_arseg_convert_lidc", "-i", demo_data_dir(), "-o", env["nnUNet_raw"], "-d",
          str(LIDC_ID), "-n", "SpeedLIDC", "--disable_progress_bar"], env)
    _run([f"{bin_dir}/nnUNetv2_plan_and_preprocess", "-d", str(LIDC_ID), "-c", "2d", "-np", "1", "-npfp", "1"], env)
    out = {"2d": f"{workdir}/pre/Dataset{LIDC_ID}_SpeedLIDC"}
    if brats:
        crops = f"{workdir}/brats_crops"
        crop_brats(brats, crops, (96, 96, 64))
        _run([f"{bin_dir}/nnUNetv2_arseg_convert_brats", "-i", crops, "-o", env["nnUNet_raw"], "-d", str(BRATS_ID),
              "-n", "SpeedBraTS", "--sequences", "flair", "t1ce", "--disable_progress_bar"], env)
        _run([f"{bin_dir}/nnUNetv2_plan_and_preprocess", "-d", str(BRATS_ID), "-c", "3d_fullres", "-np", "1",
              "-npfp", "1"], env)
        out["3d_fullres"] = f"{workdir}/pre/Dataset{BRATS_ID}_SpeedBraTS"
    return out


def crop_brats(src: str, dst: str, size_xyz) -> None:
    """Real BRATS cases (the 2013/2015 layout) cropped to ``size_xyz`` around the tumour, same layout."""
    import SimpleITK as sitk

    from dataset_conversion.brats import FILES_2015
    for split in sorted(os.listdir(src)):
        for case in sorted(os.listdir(os.path.join(src, split))) if os.path.isdir(os.path.join(src, split)) else []:
            folder = os.path.join(src, split, case)
            if not os.path.isfile(os.path.join(folder, FILES_2015["seg"])):
                continue
            seg = sitk.ReadImage(os.path.join(folder, FILES_2015["seg"]))
            centre = np.argwhere(sitk.GetArrayFromImage(seg) > 0).mean(0).astype(int)[::-1]
            start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size_xyz, seg.GetSize())]
            os.makedirs(os.path.join(dst, split, case), exist_ok=True)
            for f in (FILES_2015["flair"], FILES_2015["t1ce"], FILES_2015["seg"]):
                img = sitk.ReadImage(os.path.join(folder, f))
                sitk.WriteImage(img[tuple(slice(s, s + n) for s, n in zip(start, size_xyz))],
                                os.path.join(dst, split, case, f))


def stage_seconds(network, x_BCX: torch.Tensor, num_samples: int) -> dict:
    """Where one N-sample draw of one patch spends its time, as ``ARSegNetwork.sample`` draws it: the image encoder
    (with the presence draw, if the network has a presence head), the token sampling (transformer, for the present
    samples only, and draws, scale by scale) and the decoding of the present samples' token maps into masks."""
    from nnunet_arseg.network import class_seed
    from nnunet_arseg.segmentor.presence import draw_presence
    from nnunet_arseg.segmentor.sampling import sample_token_maps
    sync = torch.cuda.synchronize if x_BCX.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        image = network.encode_image(x_BCX)
        keep_N = None
        if network.presence_head is not None:
            keep_N = draw_presence(network.presence_head(image.presence_BND)[:, 0], num_samples,
                                   class_seed(0, 0)).flatten()
        cls_B = torch.zeros(x_BCX.shape[0], dtype=torch.long, device=x_BCX.device)
        guide_BLD = network.guide_tokens(image, cls_B)
        sync()
        t1 = time.perf_counter()
        idx_list, f_hat, _ = sample_token_maps(network.transformer, network.tokenizer.quantizer, image.prefix_BND,
                                               cls_B, num_samples, seed=class_seed(0, 0), top_k=network.top_k,
                                               active=keep_N, guide_BLD=guide_BLD)
        sync()
        t2 = time.perf_counter()
        if keep_N is None:
            network.decode_masks(f_hat, idx_list)
        elif keep_N.any():
            network.decode_masks(f_hat[keep_N], [idx[keep_N] for idx in idx_list])
        sync()
        t3 = time.perf_counter()
    present = num_samples if keep_N is None else int(keep_N.sum())
    return {"encoder": t1 - t0, "tokens": t2 - t1, "decode": t3 - t2, "present": present}


def _worker(args) -> dict:
    """One configuration in this process: build, warm up, time one prediction, report peak memory."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_arseg.network import build_arseg_architecture
    from nnunet_arseg.training.tokenizer_store import choose_latent_stride

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset_json = load_json(join(args.preprocessed, "dataset.json"))
    plans = load_json(join(args.preprocessed, "nnUNetPlans.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(args.c)
    lm = pm.get_label_manager(dataset_json)
    n_in = len(dataset_json["channel_names"])
    if args.worker == "nnunet":
        network = nnUNetTrainer.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads, False)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=device, allow_tqdm=False)
        mirroring = tuple(range(len(cm.patch_size)))
    else:
        stride = choose_latent_stride(cm.patch_size, (10.0,) * len(cm.patch_size) if args.c == "2d"
                                      else (30.0,) * 3)  # LIDC nodules / brain tumours
        arch = build_arseg_architecture(cm.configuration["architecture"], cm.patch_size, args.preset,
                                        has_regions=lm.has_regions, num_samples=args.num_samples,
                                        tokenizer={"latent_stride": list(stride)})
        plans["configurations"][args.c]["architecture"] = arch
        pm = PlansManager(plans)
        cm = pm.get_configuration(args.c)
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         n_in, lm.num_segmentation_heads, allow_init=True, deep_supervision=None)
        # the stock predictor, as nnUNetv2_predict runs it: N is the network's stored default
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=device, allow_tqdm=False)
        mirroring = None
    network.eval()
    predictor.manual_initialization(network, pm, cm, None, dataset_json, "benchmark", mirroring)
    folder = join(args.preprocessed, cm.data_identifier)
    dataset = infer_dataset_class(folder)(folder)
    case = dataset.identifiers[0]
    x = torch.from_numpy(np.asarray(dataset.load_case(case)[0][:])).float()

    def predict():
        with torch.inference_mode():
            out = predictor.predict_sliding_window_return_logits(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    predict()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = predict()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    assert torch.isfinite(torch.as_tensor(out)).all()
    tiles = len(predictor._internal_get_sliding_window_slicers(x.shape[1:]))
    tokens = sum(int(np.prod(pn)) for pn in network.tokenizer.scales) if args.worker == "arseg" else None
    x_BCX = (x[:, 0] if args.c == "2d" else x)[None].to(device)  # the case as one network input
    stages = (stage_seconds(network, x_BCX, args.num_samples)
              if args.worker == "arseg" and tuple(x_BCX.shape[2:]) == tuple(cm.patch_size) else None)
    return {"configuration": args.c, "model": args.worker, "num_samples": args.num_samples, "threads": args.threads,
            "stages": stages, "seconds": seconds, "peak_mib": round(peak), "case_shape": list(x.shape[1:]),
            "patch_size": list(cm.patch_size), "tiles": tiles, "tokens_per_sample": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-n", dest="samples", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="small", help="AR-Seg size (config.PRESETS)")
    parser.add_argument("--brats", help="folder of BRATS 2013/2015 cases: also time a whole 3d_fullres case")
    parser.add_argument("--worker", choices=["nnunet", "arseg"], help=argparse.SUPPRESS)
    parser.add_argument("--num_samples", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--preprocessed", help=argparse.SUPPRESS)
    parser.add_argument("-c", default="2d", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(_worker(args)))
        return

    with tempfile.TemporaryDirectory() as workdir:
        folders = prepare(workdir, args.brats)
        configs = [(c, threads, worker, n) for c in folders for threads in args.threads
                   for worker, n in [("nnunet", 1)] + [("arseg", n) for n in args.samples]]
        runs: dict[tuple, list[dict]] = {cfg: [] for cfg in configs}
        for r in range(args.rounds):
            for c, threads, worker, n in configs:
                cmd = [sys.executable, __file__, "-device", args.device, "--threads", str(threads), "--preset",
                       args.preset, "--preprocessed", folders[c], "-c", c, "--worker", worker, "--num_samples", str(n)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                runs[(c, threads, worker, n)].append(json.loads(line))
                seconds = runs[(c, threads, worker, n)][-1]["seconds"]
                print(f"round {r + 1}: {c} {threads} thread(s) {worker} N={n}: {seconds:.3f} s", file=sys.stderr,
                      flush=True)
    rows = []
    for (c, threads, worker, n), rs in runs.items():
        times = sorted(x["seconds"] for x in rs)
        rows.append({**rs[0], "seconds_min": times[0], "seconds_median": float(np.median(times)),
                     "peak_mib": max(x["peak_mib"] for x in rs), "rounds": len(rs),
                     "stages": min(rs, key=lambda x: x["seconds"])["stages"]})
    print(f"{'configuration':<12}{'threads':>8}  {'predictor':<26}{'min s':>8}{'median s':>9}{'x nnU-Net':>10}"
          f"{'x N=1':>7}{'peak MiB':>9}{'tiles':>6}  encoder / tokens / decode s (fastest round), present samples")
    for row in rows:
        same = [r for r in rows if r["configuration"] == row["configuration"] and r["threads"] == row["threads"]]
        base = next(r for r in same if r["model"] == "nnunet")["seconds_min"]
        n1 = next((r["seconds_min"] for r in same if r["model"] == "arseg" and r["num_samples"] == 1), None)
        name = "nnU-Net (mirroring TTA)" if row["model"] == "nnunet" else f"AR-Seg {args.preset} N={row['num_samples']}"
        x_n1 = f"{row['seconds_min'] / n1:.2f}" if n1 and row["model"] == "arseg" else "-"
        stages = (" / ".join(f"{row['stages'][k]:.3f}" for k in ("encoder", "tokens", "decode"))
                  + f", {row['stages']['present']} of {row['num_samples']}") if row["stages"] else ""
        print(f"{row['configuration']:<12}{row['threads']:>8}  {name:<26}{row['seconds_min']:>8.3f}"
              f"{row['seconds_median']:>9.3f}{row['seconds_min'] / base:>10.2f}{x_n1:>7}{row['peak_mib']:>9}"
              f"{row['tiles']:>6}  {stages}")
    print(json.dumps({"device": args.device, "torch": torch.__version__, "preset": args.preset, "results": rows}))


if __name__ == "__main__":
    main()
