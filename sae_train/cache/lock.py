"""One writer per cache directory: ``<dir>/.lock`` names the process that writes it.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ filesystems) and
holds ``{"pid", "host", "since"}``. A second writer is refused at once, naming the holder. A lock
left by a killed process on this host (its pid is gone) is stale and taken over; a lock held
from another host cannot be checked and is only reported.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from sae_train.cache.manifest import CacheError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class CacheLock:
    """Context manager holding the write lock of ``cache_dir`` (created if missing)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.path = self.dir / LOCK_NAME
        self.held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"pid": None, "host": None, "since": "?"}  # half-written by a killed run

    def _stale(self, holder: dict) -> bool:
        if not holder:
            return True  # released meanwhile
        if holder.get("pid") is None:
            # Unreadable lock: stale if it is older than a minute (a writer fills it at once).
            return time.time() - self.path.stat().st_mtime > 60
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot create cache directory {self.dir}: "
                             f"{err.strerror or err}") from err
        for _ in range(3):
            try:
                if self._try_create():
                    self.held = True
                    return
            except OSError as err:
                if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise CacheError(f"cache directory {self.dir} is not writable: "
                                     f"{err.strerror}") from err
                raise
            holder = self._holder()
            if not self._stale(holder):
                raise CacheError(
                    f"cache directory {self.dir} is being written by another sae-cache run (pid "
                    f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); "
                    f"wait for it to finish, or delete {self.path} if that process is gone")
            self.path.unlink(missing_ok=True)  # stale: taken over
        raise CacheError(f"could not take the lock {self.path}; another run keeps taking it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "CacheLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
