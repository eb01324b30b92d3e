"""A lock file for processes on several hosts that share one folder (folds started on different cluster nodes train
the dataset's tokenizer once): a lease its owner keeps renewing.

The file names its owner (host, pid, a random id of the process and one of this hold, since when) and appears whole
(written beside it, then hard-linked into place). While it holds the lock, the owner refreshes the file's mtime (its
heartbeat) from a background thread every 1/20 of the timeout (``nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES``). A lock is stale
when its heartbeat is older than the timeout (any host; hosts' clocks agree to well within it), and at once on the same
host and pid namespace when its pid is gone or is the waiter's own pid in an earlier incarnation (a restarted
container's PID 1). One waiter takes a stale lock over (under a takeover file created exclusively); the owner removes
the lock only while it still names this hold.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from nnunet_arseg import env
from nnunet_arseg.atomic import save_json_atomic

_PROCESS = uuid.uuid4().hex  # this incarnation of the process: a restarted one with the same pid has another


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def owner_record() -> dict:
    """Who takes a lock now: this host, pid and process, a new id for the hold, the time."""
    return {"host": env.hostname(), "pid_namespace": _pid_namespace(), "pid": os.getpid(), "process": _PROCESS,
            "hold": uuid.uuid4().hex, "since": time.time()}


@dataclass(frozen=True)
class Seen:
    """A lock file as read: its text, its owner (None when unreadable, e.g. an older format) and heartbeat age."""

    text: str
    owner: dict | None
    age_s: float

    def describe(self) -> str:
        if self.owner is None:
            return f"an unreadable lock (last refreshed {self.age_s:.0f} s ago)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.owner.get("since", 0)))
        return (f"host {self.owner.get('host')} pid {self.owner.get('pid')} since {since}, last heartbeat "
                f"{self.age_s:.0f} s ago")


def read_lock(path: str) -> Seen | None:
    """The lock at ``path``, or None when there is none."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        owner = owner if isinstance(owner, dict) and "hold" in owner else None
    except ValueError:
        owner = None
    return Seen(text, owner, age)


def stale_reason(seen: Seen, timeout_s: float) -> str | None:
    """Why the lock ``seen`` is stale, or None while its owner may be alive."""
    if seen.age_s > timeout_s:
        return f"no heartbeat for {seen.age_s / 60:.1f} min (timeout {timeout_s / 60:.1f} min)"
    owner = seen.owner
    if owner is None or owner.get("host") != env.hostname() or owner.get("pid_namespace") != _pid_namespace():
        return None  # another host or container: only the heartbeat tells
    if owner.get("pid") == os.getpid():
        return None if owner.get("process") == _PROCESS else "its pid is this process's, in an earlier incarnation"
    return None if _pid_alive(int(owner.get("pid", 0))) else f"process {owner.get('pid')} is gone"


def _write_new(path: str, owner: dict) -> bool:
    """Create ``path`` holding ``owner``, whole; False if it exists."""
    tmp = f"{path}.{owner['hold']}.tmp"
    with open(tmp, "w") as f:
        json.dump(owner, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _take_over(path: str, stale: Seen, owner: dict, timeout_s: float) -> bool:
    """Replace the stale lock ``stale`` by ``owner``'s, unless another waiter does so first."""
    takeover = path + ".takeover"
    if not _write_new(takeover, owner):
        seen = read_lock(takeover)
        if seen is not None and seen.age_s > timeout_s:  # a waiter killed while taking over (a millisecond's work)
            with suppress(FileNotFoundError):
                os.remove(takeover)
        return False
    try:
        now = read_lock(path)
        if now is None or now.text != stale.text or stale_reason(now, timeout_s) is None:
            return False  # released, taken over or refreshed meanwhile
        save_json_atomic(owner, path)
        return True
    finally:
        os.remove(takeover)


def _holds(path: str, owner: dict) -> bool:
    seen = read_lock(path)
    return seen is not None and seen.owner is not None and seen.owner.get("hold") == owner["hold"]


def _heartbeat(path: str, owner: dict, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        if not _holds(path, owner):
            return
        with suppress(OSError):
            os.utime(path)


@contextmanager
def exclusive(lock_file: str, poll_s: float = 5.0, log=print, timeout_s: float | None = None):
    """Hold ``lock_file`` for the block: wait while another live process holds it (saying who, once), take it over
    when it is stale; ``timeout_s`` defaults to ``nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES``."""
    timeout_s = env.lock_timeout_s() if timeout_s is None else timeout_s
    owner = owner_record()
    waited = False
    while not _write_new(lock_file, owner):
        seen = read_lock(lock_file)
        if seen is None:
            continue  # released meanwhile
        reason = stale_reason(seen, timeout_s)
        if reason is not None and _take_over(lock_file, seen, owner, timeout_s):
            log(f"took over {lock_file} from {seen.describe()}: {reason}")
            break
        if reason is None and not waited:
            log(f"waiting for {lock_file}, held by {seen.describe()} (a lock without a heartbeat for "
                f"{timeout_s / 60:.1f} min is taken over: {env.LOCK_TIMEOUT_MINUTES})")
            waited = True
        time.sleep(min(poll_s, timeout_s / 20))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock_file, owner, timeout_s / 20, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _holds(lock_file, owner):
            os.remove(lock_file)
        else:
            log(f"{lock_file} was taken over while this process held it: left to its new owner")
