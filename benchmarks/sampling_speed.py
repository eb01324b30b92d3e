"""Seconds per image of AR-Seg sampling (N = 1, 4, 16, 32) against nnU-Net's stock predictor, in one run.

Both networks are built from the same plans (a 128x128 LIDC crop, 2d configuration) and predict the same real crop
through nnU-Net's own ``nnUNetPredictor.predict_sliding_window_return_logits``: nnU-Net's U-Net with its default
mirroring test-time augmentation, AR-Seg without it (its default). Each configuration runs in a fresh process so
that its peak memory is its own. Timing does not depend on the weights (the number of steps is fixed), so untrained
networks are timed unless ``-m MODEL_FOLDER`` (an ``nnUNetTrainerARSeg*`` results folder) gives trained ones.

    python benchmarks/sampling_speed.py [-device cpu] [-n 1 4 16 32] [--repeats 3] [--preset reference|tiny]
                                        [--threads T] [-m MODEL_FOLDER]
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

DATASET_ID = 989


def _prepare_plans(workdir: str) -> str:
    """Convert the bundled LIDC sample and plan it; returns the preprocessed dataset folder."""
    env = dict(os.environ, nnUNet_raw=f"{workdir}/raw", nnUNet_preprocessed=f"{workdir}/pre",
               nnUNet_results=f"{workdir}/res", nnUNet_def_n_proc="1")
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run([f"{bin_dir}/nnUNetv2_arseg_convert_lidc", "-i", demo_data_dir(), "-o", env["nnUNet_raw"],
                    "-d", str(DATASET_ID), "-n", "SpeedBench"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([f"{bin_dir}/nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1",
                    "-npfp", "1"], env=env, check=True, stdout=subprocess.DEVNULL)
    return f"{workdir}/pre/Dataset{DATASET_ID}_SpeedBench"


def _worker(args) -> dict:
    """One configuration in this process: build, warm up, time ``--repeats`` predictions, report peak memory."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_arseg.training.trainer import nnUNetTrainerARSeg
    from nnunet_arseg.training.variants import nnUNetTrainerARSeg_tiny

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset_json = load_json(join(args.preprocessed, "dataset.json"))
    if args.model_folder:
        plans = load_json(join(args.model_folder, "plans.json"))
    else:
        plans = load_json(join(args.preprocessed, "nnUNetPlans.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    lm = pm.get_label_manager(dataset_json)
    n_in = len(dataset_json["channel_names"])
    if args.worker == "nnunet":
        trainer_class, mirroring = nnUNetTrainer, (0, 1)
    else:
        trainer_class = nnUNetTrainerARSeg_tiny if args.preset == "tiny" else nnUNetTrainerARSeg
        mirroring = None
        os.environ["nnUNet_ARSEG_NUM_SAMPLES"] = str(args.num_samples)
    network = trainer_class.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads, False)
    if args.model_folder and args.worker != "nnunet":
        ckpt = torch.load(join(args.model_folder, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                          weights_only=False)
        network.load_state_dict(ckpt["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring is not None,
                                perform_everything_on_device=True, device=device, allow_tqdm=False)
    predictor.manual_initialization(network, pm, cm, None, dataset_json, trainer_class.__name__, mirroring)
    case = sorted(f for f in os.listdir(join(args.preprocessed, cm.data_identifier)) if f.endswith(".b2nd")
                  and not f.endswith("_seg.b2nd"))[0][: -len(".b2nd")]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = join(args.preprocessed, cm.data_identifier)
    data, _, _, _ = infer_dataset_class(folder)(folder, [case]).load_case(case)
    x = torch.from_numpy(np.asarray(data[:])).float()

    def predict():
        out = predictor.predict_sliding_window_return_logits(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    predict()  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = predict()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    assert torch.isfinite(torch.as_tensor(out)).all()
    return {"config": args.worker, "num_samples": args.num_samples, "seconds": float(np.median(times)),
            "peak_mib": round(peak, 1), "peak_increase_mib": round(peak - rss_before / 1024, 1)
            if device.type == "cpu" else None, "case": case, "patch_size": list(cm.patch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-n", dest="samples", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", choices=["reference", "tiny"], default="reference",
                        help="AR-Seg size (default: the reference sizes, as nnUNetTrainerARSeg trains)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: all cores; use 1 on a machine shared with other jobs)")
    parser.add_argument("-m", dest="model_folder", default=None, help="trained nnUNetTrainerARSeg* results folder")
    parser.add_argument("--worker", choices=["nnunet", "arseg"], help=argparse.SUPPRESS)
    parser.add_argument("--num_samples", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--preprocessed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    with tempfile.TemporaryDirectory() as workdir:
        preprocessed = _prepare_plans(workdir)
        common = [sys.executable, __file__, "-device", args.device, "--repeats", str(args.repeats),
                  "--threads", str(args.threads),
                  "--preset", args.preset, "--preprocessed", preprocessed]
        if args.model_folder:
            common += ["-m", args.model_folder]
        results = []
        for worker, n in [("nnunet", 1)] + [("arseg", n) for n in args.samples]:
            line = subprocess.run(common + ["--worker", worker, "--num_samples", str(n)], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(f"{worker:>6} N={n:<3} {results[-1]['seconds']:.3f} s/image  peak {results[-1]['peak_mib']} MiB",
                  file=sys.stderr, flush=True)
    base = results[0]["seconds"]
    n1 = next((r["seconds"] for r in results if r["config"] == "arseg" and r["num_samples"] == 1), None)
    print(f"{'predictor':<28}{'s/image':>10}{'x nnU-Net':>11}{'x AR N=1':>10}{'peak MiB':>10}")
    for r in results:
        name = "nnU-Net (mirroring TTA)" if r["config"] == "nnunet" else f"AR-Seg N={r['num_samples']}"
        rel_n1 = f"{r['seconds'] / n1:.2f}" if n1 and r["config"] == "arseg" else "-"
        print(f"{name:<28}{r['seconds']:>10.3f}{r['seconds'] / base:>11.2f}{rel_n1:>10}{r['peak_mib']:>10}")
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": args.threads,
                      "preset": args.preset, "results": results}))


if __name__ == "__main__":
    main()
