"""An exclusive lock on a stage's output folder, so two runs never share checkpoints or a privacy ledger.

Two DP runs on one bundle root would overwrite each other's write-ahead ledger and resume
from each other's checkpoint (and noise level). Every stage therefore takes an exclusive
``fcntl.flock`` on ``<folder>/.lock`` at its start and holds it for the life of the process:
the kernel releases it when the process ends, also on a crash or ``kill -9``, so a stale lock
file never blocks the next run. (The ``filelock`` package does the same with more machinery;
the standard library is enough on the POSIX systems the bundle supports.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from ignite import distributed as idist
from scripts.errors import BundleError, OutputWriteError

__all__ = ["lock_folder", "release_folder", "FolderLockedError"]

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # lock file -> its open file descriptor, for this process


class FolderLockedError(BundleError, RuntimeError):
    """Another run holds the folder."""


def lock_folder(folder: str, run_name: str = "", name: str = LOCK_NAME) -> str:
    """Take the exclusive lock of ``folder`` for this process (rank 0 only; re-entrant).

    Args:
        folder: the stage's output folder (created if needed).
        run_name: written into the lock file so a refused run can name the holder.
        name: the lock file's name. The generator's stages share ``.lock`` (they read and write
            each other's files); a stage whose files no other stage writes (the evaluation's
            segmenter) takes its own name, so it can run beside them.

    Returns:
        the lock file's path.

    Raises:
        FolderLockedError: another process holds the lock; the message names it.
        OutputWriteError: the folder or its lock file cannot be created.
    """
    path = os.path.join(folder, name)
    key = os.path.realpath(path)
    if idist.get_rank() > 0 or key in _held:
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a path under a file, a read-only or full disk: name the folder, not errno
        raise OutputWriteError(
            f"{folder}: cannot create the output folder or its lock file ({err.strerror or err}); choose a "
            "writable folder (--bundle_root, --ckpt_dir, --output_dir) or fix its permissions"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, OSError):
            holder = {}
        os.close(fd)
        who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "unknown process"
        raise FolderLockedError(
            f"{folder} is in use by another run ({who}); wait for it to finish, or give this run its own "
            "--bundle_root. Two runs on one folder would overwrite each other's checkpoints and privacy ledger"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "run": run_name,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    return path


def release_folder(folder: str, name: str = LOCK_NAME) -> None:
    """Release this process's lock of ``folder`` (the end of the process releases it too).

    Args:
        folder: the folder given to :func:`lock_folder`.
        name: the lock file's name given to :func:`lock_folder`.
    """
    fd = _held.pop(os.path.realpath(os.path.join(folder, name)), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
