"""Load check of ``nnUNetv2_arseg_predict`` on many cases: it finishes, its memory stays flat, and a run killed midway
and resumed with ``--continue_prediction`` writes the same bytes as an uninterrupted one.

The same command (nnU-Net's default worker processes unless -npp/-nps are given, ``--num_samples 16``,
``--save_samples``) runs twice on the input folder, into ``WORK/uninterrupted`` and ``WORK/resumed``:

- uninterrupted: the memory of the command and all its worker processes (PSS summed, from ``/proc``) is sampled
  every ``--interval`` s together with the number of cases written. Printed: the peak per tenth of the cases and the
  ratio of the peak after the first tenth to the peak during it (flat: about 1);
- resumed: the whole process group is killed (SIGKILL) once ``--kill_after`` cases are written, then the command is
  rerun with ``--continue_prediction``; every output file (all but nnU-Net's ``predict_from_raw_data_args.json``,
  which records the ``overwrite`` flag) is compared byte for byte with the uninterrupted run's.

    python benchmarks/predict_load.py -i IMAGES -w WORK -d D -c 2d -f 0 [-tr nnUNetTrainerARSeg] [-device cuda]
        [--num_samples 16] [--min_cases 1000] [--kill_after K] [-npp P -nps S]

IMAGES: a folder of ``CASE_0000<ext>`` files of the model's dataset, e.g. the ``imagesTr`` of a converted LIDC set
(``nnUNetv2_arseg_convert_lidc``); at least ``--min_cases`` cases. Linux only (reads ``/proc``).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(name))
    return out


def _memory_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users), or its RSS where the kernel has no
    ``smaps_rollup``."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_memory_bytes(pid: int) -> int:
    """Memory of ``pid`` and all its descendants (PSS, so shared libraries count once)."""
    children, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        total += _memory_bytes(p)
    return total


def cases_written(out: str, file_ending: str) -> int:
    return sum(1 for n in os.listdir(out) if n.endswith(file_ending) and not n.startswith(".")) \
        if os.path.isdir(out) else 0


def run_command(cmd: list[str], out: str, file_ending: str, interval: float, log: str,
                kill_after: int | None = None) -> tuple[int, list[tuple[float, int, int]]]:
    """Run ``cmd`` in its own process group; returns its exit code and samples ``(seconds, cases written, memory)``.
    With ``kill_after``, SIGKILL the group once that many cases are written."""
    samples = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.time()
        while proc.poll() is None:
            done = cases_written(out, file_ending)
            samples.append((time.time() - started, done, tree_memory_bytes(proc.pid)))
            if kill_after is not None and done >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(interval)
    for _ in range(100):  # the killed group's workers are gone before the rerun starts
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    return proc.returncode, samples


def memory_by_tenth(samples: list[tuple[float, int, int]], num_cases: int) -> list[float]:
    """Peak memory (MiB) per tenth of the cases written."""
    peaks = [0.0] * 10
    for _, done, mem in samples:
        tenth = min(9, done * 10 // max(num_cases, 1))
        peaks[tenth] = max(peaks[tenth], mem / 2 ** 20)
    return peaks


def compare_outputs(a: str, b: str) -> tuple[int, list[str]]:
    """Number of files compared and the relative paths that differ or exist in only one folder."""
    def files(root):
        return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                if n != "predict_from_raw_data_args.json"}
    fa, fb = files(a), files(b)
    differ = sorted((fa ^ fb) | {f for f in fa & fb if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f),
                                                                       shallow=False)})
    return len(fa | fb), differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", required=True, help="input folder (CASE_0000<ext>, ...)")
    p.add_argument("-w", required=True, help="work folder (created); the two prediction folders go there")
    p.add_argument("-d", required=True)
    p.add_argument("-c", required=True)
    p.add_argument("-f", nargs="+", default=["0"])
    p.add_argument("-tr", default="nnUNetTrainerARSeg")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-device", default="cuda")
    p.add_argument("-npp", type=int, default=None, help="default: nnU-Net's (3, or $nnUNet_npp)")
    p.add_argument("-nps", type=int, default=None, help="default: nnU-Net's (3, or $nnUNet_nps)")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--min_cases", type=int, default=1000)
    p.add_argument("--kill_after", type=int, default=None, help="cases written before the kill; default: half")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    args = p.parse_args()

    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    file_ending = load_json(join(get_output_folder(args.d, args.tr, args.p, args.c), "dataset.json"))["file_ending"]
    num_cases = len({n[:-len(file_ending) - 5] for n in os.listdir(args.i) if n.endswith(file_ending)})
    if num_cases < args.min_cases:
        sys.exit(f"-i {args.i}: {num_cases} cases, fewer than --min_cases {args.min_cases}")
    kill_after = args.kill_after or num_cases // 2
    os.makedirs(args.w, exist_ok=True)
    uninterrupted, resumed = join(args.w, "uninterrupted"), join(args.w, "resumed")
    for folder in (uninterrupted, resumed):
        if os.path.exists(folder):
            sys.exit(f"{folder} exists; give an empty -w")

    def command(out: str, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "nnunet_arseg.inference.predict", "-i", args.i, "-o", out, "-d", args.d,
               "-c", args.c, "-f", *args.f, "-tr", args.tr, "-p", args.p, "-device", args.device,
               "--num_samples", str(args.num_samples), "--save_samples", "--disable_progress_bar", *extra]
        for flag in ("npp", "nps"):
            if getattr(args, flag) is not None:
                cmd += [f"-{flag}", str(getattr(args, flag))]
        return cmd

    print(f"{num_cases} cases, N = {args.num_samples}, --save_samples; logs in {args.w}", flush=True)
    t0 = time.time()
    rc, samples = run_command(command(uninterrupted), uninterrupted, file_ending, args.interval,
                              join(args.w, "uninterrupted.log"))
    seconds = time.time() - t0
    if rc != 0:
        sys.exit(f"the uninterrupted run failed (exit {rc}); see {join(args.w, 'uninterrupted.log')}")
    written = cases_written(uninterrupted, file_ending)
    peaks = memory_by_tenth(samples, num_cases)
    first, rest = peaks[0], max(peaks[1:])
    print(f"uninterrupted: {written} of {num_cases} cases in {seconds:.0f} s ({seconds / max(written, 1):.2f} s/case)")
    print("peak memory (PSS) of the process tree per tenth of the cases (MiB): " + ", ".join(f"{v:.0f}" for v in peaks))
    print(f"peak after the first tenth / peak during it: {rest:.0f} / {first:.0f} MiB = {rest / max(first, 1):.2f}")

    rc1, _ = run_command(command(resumed), resumed, file_ending, args.interval, join(args.w, "killed.log"),
                         kill_after=kill_after)
    at_kill = cases_written(resumed, file_ending)
    rc2, _ = run_command(command(resumed, "--continue_prediction"), resumed, file_ending, args.interval,
                         join(args.w, "resumed.log"))
    if rc2 != 0:
        sys.exit(f"the resumed run failed (exit {rc2}); see {join(args.w, 'resumed.log')}")
    compared, differ = compare_outputs(uninterrupted, resumed)
    print(f"killed (exit {rc1}) after {at_kill} cases, resumed with --continue_prediction: {compared} files compared, "
          f"{len(differ)} differ" + (f": {differ[:10]}" if differ else " (byte-identical)"))
    result = {"cases": num_cases, "written": written, "num_samples": args.num_samples, "seconds": seconds,
              "peak_pss_mib_per_tenth": peaks, "peak_ratio_after_first_tenth": rest / max(first, 1),
              "killed_after": at_kill, "files_compared": compared, "files_differing": differ}
    with open(join(args.w, "predict_load.json"), "w") as f:
        json.dump(result, f, indent=1)
    sys.exit(1 if differ or written != num_cases else 0)


if __name__ == "__main__":
    main()
