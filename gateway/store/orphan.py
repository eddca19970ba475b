"""Child processes that die with their parent (Linux), without ``preexec_fn``; and whether
a process still runs (``pid_alive``).

``preexec_fn`` is unsafe in a process with threads. Instead the child starts as a tiny
Python shim that asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``,
kept across ``execve``) and then becomes the real program. Elsewhere the shim just execs.
"""

from __future__ import annotations

import os
import sys

_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() == int(sys.argv[1]):\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_parent(args: list[str]) -> list[str]:
    """``args`` wrapped so the program gets SIGTERM when this process dies."""
    return [sys.executable, "-c", _SHIM, str(os.getpid()), *args]


def pid_alive(pid: int) -> bool:
    """True if a process with this pid runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
