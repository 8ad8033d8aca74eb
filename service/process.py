"""What every service process sets about itself: files private to its user, and (on Linux) a
signal when the process that started it dies, so that nothing it started outlives ``serve``."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Callable

__all__ = ["private_files", "private_dir", "die_with_parent", "dies_with_me", "PRIVATE_UMASK"]

PRIVATE_UMASK = 0o077  # files 0600, folders 0700
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def private_files() -> None:
    """Files and folders this process creates from now on (uploads, outputs, the database, the
    embedded Redis's files and socket) are for its own user only; children inherit it."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (made, or an existing one narrowed: what an
    earlier version left readable inside it is then out of reach too)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None, prctl=None) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that started it ends
    (``prctl(PR_SET_PDEATHSIG)``); False where that does not exist (not Linux). If ``parent``
    (its pid) is already gone, the signal is sent at once."""
    prctl = prctl or _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def dies_with_me(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when the calling
    thread ends (so start children from a thread that lives as long as they should). prctl is
    looked up here, before the fork, so the child only makes the call. None where not Linux."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None
    return lambda: (die_with_parent(sig, parent, prctl), None)[1]
