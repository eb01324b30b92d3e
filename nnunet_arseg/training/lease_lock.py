"""A lock file for processes on several hosts that share one folder (folds started on different cluster nodes train
the dataset's tokenizer once): a lease its owner keeps renewing while its work moves on.

The file names its owner (host, pid, a random id of the process and one of this hold, since when) and appears whole
(written beside it, then hard-linked into place; created exclusively where the file system has no hard links). The
owner refreshes the file's mtime (its heartbeat) from a background thread every 1/20 of the timeout
(``nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES``), as long as its work reported progress (``Hold.progress``) within the timeout:
a hung owner stops refreshing it. A lock is stale when its heartbeat is older than the timeout, measured in the file
system's clock (the lock's mtime against that of a file just touched beside it, so the hosts' clocks need not agree),
and at once on the same host and pid namespace when its pid is gone or is the waiter's own pid in an earlier
incarnation (a restarted container's PID 1). One waiter takes a stale lock over (under a takeover file created
exclusively). An owner that finds the lock taken over (it was suspended or stalled past the timeout), or cannot read
or refresh it for half the timeout, has lost its hold: ``Hold.check``, called before each write, then raises
``LockLost``. The owner removes the lock only while it still names this hold.
"""
from __future__ import annotations

import errno
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
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV)


class LockLost(RuntimeError):
    """This process no longer holds the lock it entered: what it was about to write is another owner's now."""


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


def filesystem_now(path: str) -> float:
    """The time now on the clock that stamps the mtimes of ``path``'s folder (on a network file system the server's):
    the mtime of a file touched beside ``path``."""
    probe = f"{path}.{uuid.uuid4().hex[:8]}.now"
    try:
        with open(probe, "w"):
            pass
        os.utime(probe)
        return os.stat(probe).st_mtime
    finally:
        with suppress(FileNotFoundError):
            os.remove(probe)


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


def _parse(text: str) -> dict | None:
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and "hold" in owner else None


def read_lock(path: str) -> Seen | None:
    """The lock at ``path``, its age in the file system's clock, or None when there is none."""
    try:
        with open(path) as f:
            text = f.read()
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return Seen(text, _parse(text), filesystem_now(path) - mtime)


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


def create_json(path: str, obj) -> bool:
    """Create ``path`` holding ``obj`` as JSON, whole (hard-linked into place; created exclusively and written where
    the file system has no hard links); False, leaving it as it is, if it exists."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
    finally:
        os.remove(tmp)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    return True


def _take_over(path: str, stale: Seen, owner: dict, timeout_s: float) -> bool:
    """Replace the stale lock ``stale`` by ``owner``'s, unless another waiter does so first."""
    takeover = path + ".takeover"
    if not create_json(takeover, owner):
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


def _holder(path: str) -> tuple[str, dict | None] | None:
    """The lock's text and owner (no age: no probe file), or None when there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return text, _parse(text)


class Hold:
    """This process's hold of a lock, as ``exclusive`` yields it: the work calls ``progress()`` as it moves on (the
    heartbeat renews the lock only while it does) and ``check()`` before each write that only the owner may make."""

    def __init__(self, path: str, owner: dict, timeout_s: float, log):
        self.path, self.owner, self.timeout_s, self.log = path, owner, timeout_s, log
        self.every_s = timeout_s / 20
        self.lost: str | None = None  # why this process no longer holds the lock
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def progress(self) -> None:
        """The work moved on: the heartbeat keeps renewing the lock for another timeout."""
        self._last_progress = time.monotonic()

    def _whose(self) -> str | None:
        """None while the lock names this hold, else who or what holds it now (reads the file: may raise OSError)."""
        seen = _holder(self.path)
        if seen is None:
            return "the lock file was removed (released by a process that had taken it over)"
        owner = seen[1]
        if owner is not None and owner.get("hold") == self.owner["hold"]:
            return None
        return "it was taken over by " + (f"host {owner.get('host')} pid {owner.get('pid')}" if owner
                                          else "an unreadable lock")

    def _heartbeat(self) -> None:
        failing_since, stalled = None, False
        while not self._stop.wait(self.every_s):
            try:
                self.lost = self._whose()
                if self.lost is not None:
                    self.log(f"this process no longer holds {self.path}: {self.lost}")
                    return
                if time.monotonic() - self._last_progress < self.timeout_s:
                    os.utime(self.path)
                    stalled = False
                elif not stalled:
                    stalled = True
                    self.log(f"no progress for {self.timeout_s / 60:.1f} min: {self.path} is no longer renewed, "
                             f"another process may take it over")
                failing_since = None
            except OSError as error:  # e.g. ESTALE or EIO on a network file system: tried again at the next beat
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= self.timeout_s / 2:
                    self.lost = f"it could not be read or renewed for {time.monotonic() - failing_since:.0f} s " \
                                f"({error})"
                    return
            except Exception as error:  # never a silently dead heartbeat: the next check() says why
                self.lost = f"its heartbeat failed ({error!r})"
                raise

    def check(self) -> None:
        """Raise ``LockLost`` (saying why) unless the lock still names this hold, read now; a read that fails is tried
        again for up to a quarter of the timeout."""
        deadline = time.monotonic() + self.timeout_s / 4
        while self.lost is None:
            try:
                self.lost = self._whose()
                break
            except OSError as error:
                if time.monotonic() >= deadline:
                    self.lost = f"it could not be read ({error})"
                time.sleep(self.every_s)
        if self.lost is not None:
            raise LockLost(f"this process no longer holds {self.path}: {self.lost}")


@contextmanager
def exclusive(lock_file: str, poll_s: float = 5.0, log=print, timeout_s: float | None = None):
    """Hold ``lock_file`` for the block, which gets the ``Hold``: wait while another live process holds it (saying
    who, once), take it over when it is stale; ``timeout_s`` defaults to ``nnUNet_ARSEG_LOCK_TIMEOUT_MINUTES``."""
    timeout_s = env.lock_timeout_s() if timeout_s is None else timeout_s
    owner = owner_record()
    waited = False
    while not create_json(lock_file, owner):
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
    hold = Hold(lock_file, owner, timeout_s, log)
    hold._thread.start()
    try:
        yield hold
    finally:
        hold._stop.set()
        hold._thread.join()
        try:
            why = hold.lost or hold._whose()
        except OSError as error:
            why = f"it could not be read ({error})"
        if why is None:
            os.remove(lock_file)
        else:
            log(f"{lock_file} left as it is, not released by this process: {why}")
