"""The dataset's tokenizer: latent stride from the data, held-out split, masks drawn from preprocessed cases, lock."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_arseg.training.tokenizer_store import (choose_latent_stride, median_object_extent, sizing_cases,
                                                   split_heldout, tokenizer_key, tokenizer_name, why_train)
from nnunet_arseg.training.lease_lock import LockLost, exclusive, owner_record
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig


def test_latent_stride_follows_object_size_and_caps_the_token_map():
    # LIDC: 128x128 patches, median nodule about 10 px: stride 4 would give a 32x32 latent (1,024 tokens at the
    # finest scale), so the cap of 256 positions makes it 8 (16x16)
    assert choose_latent_stride((128, 128), (10.0, 10.0)) == (8, 8)
    assert choose_latent_stride((128, 128), (10.0, 10.0), max_positions=1024) == (4, 4)
    # large objects: coarse latent; a 512x512 CT patch stays within the cap whatever the objects
    assert choose_latent_stride((128, 128), (60.0, 60.0)) == (32, 32)
    assert choose_latent_stride((512, 512), (10.0, 10.0)) == (32, 32)
    # 3D, anisotropic objects and a patch axis that limits the stride
    stride = choose_latent_stride((48, 160, 128), (6.0, 40.0, 40.0))
    assert all(n % s == 0 for n, s in zip((48, 160, 128), stride))
    assert np.prod([n // s for n, s in zip((48, 160, 128), stride)]) <= 256 and stride[0] < stride[1]


def test_median_object_extent_counts_connected_objects():
    seg = np.zeros((1, 32, 32), dtype=np.int8)
    seg[0, 2:6, 2:4] = 1  # 4 x 2
    seg[0, 10:20, 10:30] = 1  # 10 x 20
    seg[0, 25:28, 25:28] = 2  # another label: 3 x 3
    assert median_object_extent([seg], [1]) == (7.0, 11.0)
    assert median_object_extent([seg], [1, 2]) == (4.0, 3.0)
    assert median_object_extent([seg], [(1, 2)]) == (4.0, 3.0)  # a region
    with pytest.raises(ValueError, match="no foreground"):
        median_object_extent([np.zeros((8, 8))], [1])


def test_heldout_split_is_by_patient_and_seeded():
    cases = [f"c{i:02d}" for i in range(40)]
    patient = {c: f"p{int(c[1:]) // 4}" for c in cases}  # 10 patients of 4 cases
    train, held = split_heldout(cases, patient, fraction=0.2)
    assert len(held) == 8 and set(train) | set(held) == set(cases)
    assert {patient[c] for c in train}.isdisjoint({patient[c] for c in held})
    assert split_heldout(cases, patient, fraction=0.2) == (train, held)
    assert len(split_heldout(cases, None, fraction=0.05)[1]) == 2  # without patients: cases


def test_the_stride_is_sized_from_cases_drawn_from_the_sorted_identifiers():
    """nnU-Net lists a dataset's identifiers in the file system's order: two copies of one dataset (node-local
    preprocessed data) must size the latent stride from the same cases."""
    cases = [f"case_{i:04d}" for i in range(600)]
    listed_elsewhere = [str(k) for k in np.random.default_rng(1).permutation(cases)]
    drawn = sizing_cases(cases)
    assert sizing_cases(listed_elsewhere) == drawn and len(set(drawn)) == 500 and set(drawn) <= set(cases)
    assert sorted(sizing_cases(listed_elsewhere[:20])) == sorted(listed_elsewhere[:20])  # fewer: all of them


def test_tokenizer_name_depends_on_widths_patch_size_and_spacing():
    key = tokenizer_key({"ch": 32, "z_channels": 32}, (64, 64), (1.0, 1.0))
    assert tokenizer_name(key) == tokenizer_name(tokenizer_key({"z_channels": 32, "ch": 32}, [64, 64], [1, 1]))
    for other in (tokenizer_key({"ch": 16}, (64, 64), (1.0, 1.0)), tokenizer_key({"ch": 32}, (128, 64), (1.0, 1.0)),
                  tokenizer_key({"ch": 32}, (64, 64), (0.5, 1.0))):
        assert tokenizer_name(other) != tokenizer_name(tokenizer_key({"ch": 32}, (64, 64), (1.0, 1.0)))


def test_a_stored_or_given_tokenizer_is_reused_and_a_new_one_is_sized_from_the_data(tmp_path, monkeypatch):
    import torch

    from nnunet_arseg.tokenizer import MaskTokenizer
    from nnunet_arseg.training.tokenizer_store import load_tokenizer_file, resolve_dataset_tokenizer

    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    widths = {"ch": 8, "num_res_blocks": 1, "z_channels": 8, "codebook_size": 16, "code_dim": 4, "space_to_depth": 2}
    asked = []

    def extent():
        asked.append(1)
        return (10.0, 10.0)

    new = resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (64, 64), (1.0, 1.0), widths, extent)
    assert not new.exists() and new.arch_kwargs == {**widths, "latent_stride": [4, 4]} and asked == [1]
    assert "ARSegTokenizer__nnUNetPlans__2d" in new.path
    model = MaskTokenizer(2, (64, 64), **new.arch_kwargs)
    os.makedirs(new.folder, exist_ok=True)
    torch.save({"arch_kwargs": new.arch_kwargs, "patch_size": [64, 64], "spacing": [1.0, 1.0],
                "state_dict": model.state_dict()}, new.path)
    # another fold or variant with the same widths: the stored tokenizer, without reading the data again
    again = resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (64, 64), (1.0, 1.0), widths, extent)
    assert again.path == new.path and again.exists() and asked == [1]
    # the user's tokenizer, checked against the patch size
    monkeypatch.setenv("nnUNet_ARSEG_TOKENIZER", new.path)
    given = resolve_dataset_tokenizer(str(tmp_path / "other"), "nnUNetPlans", "2d", (64, 64), (1.0, 1.0), {"ch": 32},
                                      extent)
    assert given.given and given.path == new.path and given.arch_kwargs == new.arch_kwargs
    with pytest.raises(ValueError, match="patch size"):
        resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (128, 128), (1.0, 1.0), widths, extent)
    (tmp_path / "not_a_tokenizer.pth").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "not_a_tokenizer.pth")
    with pytest.raises(ValueError, match="not an AR-Seg tokenizer"):
        load_tokenizer_file(str(tmp_path / "not_a_tokenizer.pth"))


def test_hosts_whose_data_differ_build_the_architecture_their_folder_records(tmp_path, monkeypatch):
    """The latent stride follows the data; hosts whose copies of the preprocessed data differ would size it apart for
    one tokenizer folder. The first to resolve the folder records its architecture, which the others then build;
    a stored file of another architecture is refused when loaded, never used by a network built for another one."""
    from nnunet_arseg.tokenizer import MaskTokenizer
    from nnunet_arseg.training.tokenizer_store import (DatasetTokenizer, resolve_dataset_tokenizer,
                                                       train_dataset_tokenizer)
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    widths = {k: v for k, v in WIDTHS.items() if k != "latent_stride"}

    def resolve(extent):
        return resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (32, 32), (1.0, 1.0), widths,
                                         lambda: extent)

    first, second = resolve((10.0, 10.0)), resolve((40.0, 40.0))  # node A's data: small objects, node B's: large
    assert first.folder == second.folder and second.arch_kwargs == first.arch_kwargs
    assert first.arch_kwargs["latent_stride"] == [4, 4]
    # a network built for another stride (e.g. resolved by an older version before the folder had a record)
    torch.save({"arch_kwargs": first.arch_kwargs, "patch_size": [32, 32], "spacing": [1.0, 1.0],
                "state_dict": MaskTokenizer(2, (32, 32), **first.arch_kwargs).state_dict()}, first.path)
    other = DatasetTokenizer(first.path, {**first.arch_kwargs, "latent_stride": [16, 16]}, False, first.key)
    with pytest.raises(ValueError, match=r"has another architecture than this run builds: latent_stride \[4, 4\] "
                                         r"\(this run: \[16, 16\]\)"):
        train_dataset_tokenizer(other, (32, 32), None, None, TokenizerFitConfig(), torch.device("cpu"))
    assert train_dataset_tokenizer(first, (32, 32), None, None, TokenizerFitConfig(), torch.device("cpu"))


# ---------------------------------------------------------------- the lock, across hosts
def _lock_record(path, age_s: float = 0.0, **owner) -> dict:
    """Write a lock another process holds (``owner`` over a record of this process), its heartbeat ``age_s`` old."""
    record = {**owner_record(), "process": "another-process", **owner}
    with open(path, "w") as f:
        json.dump(record, f)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return record


def _acquire(lock, within_s: float, timeout_s: float = 60.0) -> tuple[bool, list[str]]:
    """Whether ``exclusive(lock)`` is entered within ``within_s`` (in a thread, so a lock never taken fails the test
    instead of hanging it), and what it logged. An entered lock is left before this returns, so the test's next lock
    record cannot be removed by this hold's release."""
    logs, entered = [], threading.Event()

    def run():
        with exclusive(str(lock), poll_s=0.02, log=logs.append, timeout_s=timeout_s):
            entered.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    took = entered.wait(within_s)
    if took:
        thread.join(within_s)
        assert not thread.is_alive(), f"the hold of {lock} was not released within {within_s} s"
    return took, logs


def test_a_lock_without_heartbeat_is_taken_over_on_any_host_and_a_live_one_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_ARSEG_HOSTNAME", "node-a")
    lock = tmp_path / ".lock"
    _lock_record(lock, age_s=120, host="node-b", pid=1)  # killed on node-b two minutes ago
    took, logs = _acquire(lock, within_s=5, timeout_s=60)
    assert took and "took over" in logs[0] and "host node-b pid 1" in logs[0] and "no heartbeat for 2.0 min" in logs[0]
    # a live lock on another host: its pid means nothing here (dead on this host), its heartbeat is fresh
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = _lock_record(lock, age_s=1, host="node-c", pid=int(dead.stdout))
    took, logs = _acquire(lock, within_s=1.0, timeout_s=60)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
    assert not took and json.loads(lock.read_text())["hold"] == record["hold"]
    assert logs == [f"waiting for {lock}, held by host node-c pid {dead.stdout.strip()} since {since}, last heartbeat "
                    f"1 s ago (a lock without a heartbeat for 1.0 min is taken over: "
                    f"nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES)"]


def test_a_lock_of_a_dead_pid_or_an_earlier_incarnation_on_this_host_is_taken_over_at_once(tmp_path):
    lock = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock_record(lock, pid=int(dead.stdout))
    took, logs = _acquire(lock, within_s=5)
    assert took and f"process {dead.stdout.strip()} is gone" in logs[0]
    _lock_record(lock, pid=os.getpid())  # this pid, another process: e.g. PID 1 of a restarted container
    took, logs = _acquire(lock, within_s=5)
    assert took and "earlier incarnation" in logs[0]


def test_waiters_on_a_stale_lock_take_it_one_at_a_time_and_the_heartbeat_keeps_it(tmp_path):
    """Four threads find one stale lock: one takes it over, the others wait for it; each holds it longer than the
    timeout, which only the owner's heartbeat makes safe."""
    lock = tmp_path / ".lock"
    _lock_record(lock, age_s=10, host="node-b")
    held, logs, start = [], [], threading.Barrier(4)

    def run():
        start.wait()
        with exclusive(str(lock), poll_s=0.02, log=logs.append, timeout_s=0.5):
            t0 = time.monotonic()
            time.sleep(0.7)
            held.append((t0, time.monotonic()))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(held) == 4 and not lock.exists()
    held.sort()
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:])), held  # never two at once
    assert sum("took over" in m for m in logs) == 1, logs


def test_release_leaves_a_lock_another_process_took_over(tmp_path):
    lock = tmp_path / ".lock"
    logs = []
    with exclusive(str(lock), log=logs.append, timeout_s=60):
        ours = json.loads(lock.read_text())
        assert ours["pid"] == os.getpid() and ours["host"] == owner_record()["host"]
        theirs = _lock_record(lock, host="node-b")  # judged stale elsewhere (e.g. this process was suspended)
    assert json.loads(lock.read_text()) == theirs and "taken over" in logs[-1]


def test_lock_age_is_measured_in_the_file_systems_clock(tmp_path, monkeypatch):
    """A node whose clock runs an hour ahead waits for a live lock; one whose clock runs an hour behind still takes a
    dead one over: both measure the heartbeat against the clock that stamped it."""
    lock = tmp_path / ".lock"
    real_time = time.time
    _lock_record(lock, age_s=120, host="node-c")
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    took, logs = _acquire(lock, within_s=5, timeout_s=60)
    assert took and "no heartbeat for 2.0 min" in logs[0]
    monkeypatch.setattr(time, "time", real_time)
    _lock_record(lock, age_s=1, host="node-b")
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    took, logs = _acquire(lock, within_s=1.0, timeout_s=60)
    assert not took and "last heartbeat 1 s ago" in logs[0]


def test_a_holder_whose_work_makes_no_progress_is_taken_over(tmp_path):
    """The heartbeat thread of a hung holder lives on but stops renewing the lock after a timeout without progress;
    a waiter then takes the lock over, and the holder, resuming, finds it has lost its hold."""
    lock, logs, lost = tmp_path / ".lock", [], []
    entered, resume = threading.Event(), threading.Event()

    def hung():
        with exclusive(str(lock), poll_s=0.02, log=logs.append, timeout_s=0.5) as hold:
            hold.progress()
            entered.set()
            resume.wait(20)  # the work hangs
            try:
                hold.check()
            except LockLost as error:
                lost.append(str(error))

    holder = threading.Thread(target=hung, daemon=True)
    holder.start()
    assert entered.wait(5)
    took, waiter_logs = _acquire(lock, within_s=10, timeout_s=0.5)
    resume.set()
    holder.join(5)
    assert took and any("took over" in m and "no heartbeat" in m for m in waiter_logs), waiter_logs
    assert logs[0].startswith("no progress for 0.0 min:") and lost and "no longer holds" in lost[0], (logs, lost)


def test_heartbeat_errors_are_tried_again_and_a_lasting_one_loses_the_hold(tmp_path):
    """A lock that cannot be read for a moment (ESTALE or EIO on a network file system; here the path is a folder)
    is renewed again once it can; one that cannot be read for half the timeout is a lost hold, which ``check`` says."""
    lock, saved, logs = tmp_path / ".lock", tmp_path / "saved", []

    def unreadable(seconds):
        os.rename(lock, saved)
        os.mkdir(lock)
        time.sleep(seconds)
        os.rmdir(lock)
        os.rename(saved, lock)

    with exclusive(str(lock), log=logs.append, timeout_s=1.0) as hold:
        unreadable(0.2)  # four beats
        os.utime(lock, (time.time() - 30, time.time() - 30))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 0.2, "the heartbeat stopped at the first error"
        hold.check()
        unreadable(1.0)
        with pytest.raises(LockLost, match=r"could not be read or renewed for \d s \(\[Errno 21\] Is a directory"):
            hold.check()
    assert lock.exists() and "not released by this process" in logs[-1]


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_hard_links(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", src, None, dst)

    monkeypatch.setattr(os, "link", no_hard_links)
    lock = tmp_path / ".lock"
    with exclusive(str(lock), log=print, timeout_s=60):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not _acquire(lock, within_s=0.5)[0]
    assert _acquire(lock, within_s=5)[0]


HOLDER = """
import sys, time
from pathlib import Path
import torch
from test_tokenizer_store import _train
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
torch.set_num_threads(1)
results, lidc, steps, pause = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def log(message):
    print(message, flush=True)
    if message.startswith("tokenizer step"):
        time.sleep(pause)

_train(results, lidc, TokenizerFitConfig(max_steps=steps, batch_size=4, eval_every=2, warmup_steps=1,
                                         target_dice=1.01), log=log)
print("returned", flush=True)
"""


def test_a_suspended_holder_stops_before_writing_the_tokenizer_another_process_trained(tmp_path, lidc_demo,
                                                                                      monkeypatch):
    """Slurm suspends (SIGSTOP) the process training the tokenizer for longer than the timeout; another (this one)
    takes the lock over and stores the tokenizer. Resumed (SIGCONT), the first stops without writing, saying why."""
    monkeypatch.setenv("nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES", "0.05")
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(lidc_demo), "40", "0.3"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        while not (seen and seen[-1].startswith("tokenizer step")):
            seen.append(first.stdout.readline())
            assert seen[-1], f"the first process ended before its first evaluation: {''.join(seen)}"
        os.kill(first.pid, signal.SIGSTOP)
        try:
            cfg = TokenizerFitConfig(max_steps=6, batch_size=4, eval_every=2, warmup_steps=1, target_dice=1.01)
            tok, stored, logs = _train(tmp_path, lidc_demo, cfg)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first_out = "".join(seen) + first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert any("took over" in m and "no heartbeat" in m for m in logs), logs
    assert stored["summary"]["steps"] == 6 and any("resuming at step 2" in m for m in logs), logs
    assert first.returncode != 0 and "returned" not in first_out, first_out
    assert "no longer holds" in first_out and "stopped training the tokenizer without writing it" in first_out
    after = torch.load(tok.path, weights_only=False)["state_dict"]
    assert all(torch.equal(v, after[k]) for k, v in stored["state_dict"].items()), "the resumed one overwrote it"
    assert sorted(os.listdir(tok.folder)) == ["architecture.json", "progress.png", "summary.json", "tokenizer.pth"]


# ---------------------------------------------------------------- a stored tokenizer is used only if it fits
WIDTHS = {"ch": 8, "num_res_blocks": 1, "z_channels": 8, "codebook_size": 32, "code_dim": 8, "space_to_depth": 2,
          "latent_stride": 8}


class LidcMasks:
    """Real rater masks of the bundled LIDC crops (32 x 32 centre crops), drawn as ``PreprocessedMasks.draw``."""

    def __init__(self, lidc_demo, patients):
        from test_tokenizer import lidc_masks
        self.identifiers = sorted(patients)
        self.masks = lidc_masks(lidc_demo, 32, patients=patients)

    def draw(self, rng, batch_size):
        return self.masks[rng.integers(len(self.masks), size=batch_size)]


def _train(tmp_path, lidc_demo, cfg, device="cpu", log=None):
    from nnunet_arseg.training.tokenizer_store import resolve_dataset_tokenizer, train_dataset_tokenizer
    patients = sorted(p.name for p in lidc_demo.glob("LIDC-IDRI-*"))
    tok = resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (32, 32), (1.0, 1.0), WIDTHS, None)
    logs = []
    stored = train_dataset_tokenizer(tok, (32, 32), LidcMasks(lidc_demo, patients[:6]),
                                     LidcMasks(lidc_demo, patients[6:]), cfg, torch.device(device), num_heldout=16,
                                     log=log or logs.append)
    return tok, stored, logs


def test_an_undertrained_tokenizer_is_trained_further_and_one_that_fits_is_reused(tmp_path, lidc_demo, monkeypatch):
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    short = TokenizerFitConfig(max_steps=4, batch_size=4, eval_every=2, warmup_steps=1, target_dice=1.01)
    tok, stored, logs = _train(tmp_path, lidc_demo, short)
    assert stored["summary"]["steps"] == 4 and not stored["summary"]["target_reached"]
    assert "because there is none yet" in logs[0]
    # a variant asking for more steps (as _tiny_demo over _tiny): trained further from the stored weights
    longer = TokenizerFitConfig(**{**short.to_dict(), "max_steps": 6})
    assert "falls short: it was trained 4 steps" in why_train(tok, longer)
    tok2, stored2, logs = _train(tmp_path, lidc_demo, longer)
    assert tok2.path == tok.path and "trained 4 steps" in logs[0] and "resuming at step 4" in logs[0]
    assert stored2["summary"]["steps"] == 6 and [h["step"] for h in stored2["summary"]["history"]] == [2, 4, 6]
    assert any(not torch.equal(v, stored["state_dict"][k]) for k, v in stored2["state_dict"].items())
    # asking for less, or for a target it reached: reused as it is
    for fits in (short, TokenizerFitConfig(**{**longer.to_dict(), "max_steps": 100, "target_dice": 0.0,
                                              "target_empty": 0.0})):
        assert why_train(tok2, fits) is None
        assert _train(tmp_path, lidc_demo, fits)[2] == []
    assert sorted(os.listdir(tok.folder)) == ["architecture.json", "progress.png", "summary.json", "tokenizer.pth"]


def test_the_lock_holder_removes_what_a_killed_holder_left_unfinished(tmp_path, lidc_demo, monkeypatch):
    from nnunet_arseg.training.tokenizer_store import resolve_dataset_tokenizer
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    folder = Path(resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", (32, 32), (1.0, 1.0), WIDTHS,
                                            None).folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".tmp-0a1b2c3d-tokenizer_latest.pth").write_bytes(b"cut short")  # a holder killed while writing
    (folder / ".lock.0a1b2c3d.tmp").write_text("{}")  # a waiter (on another host) creating the lock right now
    cfg = TokenizerFitConfig(max_steps=2, batch_size=4, eval_every=2, warmup_steps=1, target_dice=1.01)
    logs = _train(tmp_path, lidc_demo, cfg)[2]
    assert "removed 1 unfinished file(s) of an interrupted run" in logs[0] and "0a1b2c3d-tokenizer_latest" in logs[0]
    assert sorted(os.listdir(folder)) == [".lock.0a1b2c3d.tmp", "architecture.json", "progress.png", "summary.json",
                                          "tokenizer.pth"]


def test_a_replanned_configuration_gets_its_own_tokenizer_and_a_foreign_file_is_refused(tmp_path, monkeypatch):
    from nnunet_arseg.tokenizer import MaskTokenizer
    from nnunet_arseg.training.tokenizer_store import resolve_dataset_tokenizer
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)

    def resolve(patch, spacing, widths=WIDTHS):
        return resolve_dataset_tokenizer(str(tmp_path), "nnUNetPlans", "2d", patch, spacing, widths, lambda: (8., 8.))

    first = resolve((32, 32), (1.0, 1.0))
    os.makedirs(first.folder, exist_ok=True)
    torch.save({"arch_kwargs": first.arch_kwargs, "patch_size": [32, 32], "spacing": [1.0, 1.0],
                "state_dict": MaskTokenizer(2, (32, 32), **first.arch_kwargs).state_dict()}, first.path)
    assert resolve((32, 32), (1.0, 1.0)).exists()
    # re-planned under the same plans name: another patch size or spacing is another tokenizer, none yet
    for patch, spacing in (((64, 32), (1.0, 1.0)), ((32, 32), (0.7, 0.7))):
        other = resolve(patch, spacing)
        assert other.folder != first.folder and not other.exists()
    # a file that was not written for its folder's settings (copied there by hand): a clear error, no silent reuse
    other = resolve((64, 32), (1.0, 1.0))
    os.makedirs(other.folder, exist_ok=True)
    shutil.copy(first.path, other.path)
    with pytest.raises(ValueError, match=r"not trained for this trainer's tokenizer settings: patch size \[32, 32\] "
                                         r"\(asked: \[64, 32\]\). Move the folder"):
        resolve((64, 32), (1.0, 1.0))
    wider = resolve((32, 32), (1.0, 1.0), {**WIDTHS, "ch": 16})
    os.makedirs(wider.folder, exist_ok=True)
    shutil.copy(first.path, wider.path)
    with pytest.raises(ValueError, match=r"settings: ch 8 \(asked: 16\)"):
        resolve((32, 32), (1.0, 1.0), {**WIDTHS, "ch": 16})


def test_resume_refuses_a_checkpoint_of_another_tokenizer_architecture(tmp_path, monkeypatch):
    from nnunet_arseg.tokenizer import MaskTokenizer
    from nnunet_arseg.training.tokenizer_store import DatasetTokenizer, check_checkpoint_tokenizer
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    old_kwargs, new_kwargs = WIDTHS, {**WIDTHS, "latent_stride": 4}
    old, new = MaskTokenizer(2, (32, 32), **old_kwargs), MaskTokenizer(2, (32, 32), **new_kwargs)
    old_path = str(tmp_path / "tok_old" / "tokenizer.pth")
    os.makedirs(os.path.dirname(old_path))
    torch.save({"arch_kwargs": old_kwargs, "patch_size": [32, 32], "state_dict": old.state_dict()}, old_path)
    checkpoint = {"arseg_tokenizer": old_path,
                  "network_weights": {"module.tokenizer." + k: v for k, v in old.state_dict().items()}}
    check_checkpoint_tokenizer(checkpoint, DatasetTokenizer(old_path, old_kwargs, False), old)
    new_tok = DatasetTokenizer(str(tmp_path / "tok_new" / "tokenizer.pth"), new_kwargs, False)
    with pytest.raises(RuntimeError, match=f"continue it with that tokenizer \\(nnUNet_ARSEG_TOKENIZER={old_path} "):
        check_checkpoint_tokenizer(checkpoint, new_tok, new)
    os.remove(old_path)
    with pytest.raises(RuntimeError, match=r"train the fold anew \(without --c\)$"):
        check_checkpoint_tokenizer(checkpoint, new_tok, new)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_an_interrupted_tokenizer_resumes_on_its_device(tmp_path, lidc_demo, monkeypatch, device):
    """Stopped right after a checkpoint (as a kill would), the same call resumes from ``tokenizer_latest.pth`` (on
    CUDA the saved random generator states must come back as CPU tensors) and ends with the uninterrupted weights."""
    monkeypatch.delenv("nnUNet_ARSEG_TOKENIZER", raising=False)
    cfg = TokenizerFitConfig(max_steps=4, batch_size=4, eval_every=2, warmup_steps=1, target_dice=1.01)
    _, whole, _ = _train(tmp_path / "whole", lidc_demo, cfg, device)

    def kill_at_step_2(message):
        if message.startswith("tokenizer step 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "killed", lidc_demo, cfg, device, log=kill_at_step_2)
    tok, resumed, logs = _train(tmp_path / "killed", lidc_demo, cfg, device)
    assert "resuming at step 2" in logs[0] and resumed["summary"]["steps"] == 4
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
