"""CPU thread policy: how many threads torch uses for a piece of work, chosen by the work's size.

torch's default (one thread per core) spins its workers between kernels. For small work (a tiny or demo
model's forward, a registration step of a few hundred thousand points) that spinning costs more than the
arithmetic, and on a busy machine it ran 5-20x slower than one thread; large GEMMs (a ViT-B forward over
a chunk of slices) gain about 1.8x from two threads on an idle 2-core machine. So:

    work below SMALL_WORK_FLOPS per call      -> 1 thread
    larger work                               -> every core this process may use (os.sched_getaffinity)

An explicit choice wins over the policy, in this order: the ``threads`` argument (the CLI's ``--threads N``),
then the environment variable ``HEADCT_THREADS``. ``0`` or ``auto`` means "choose by work size".

Standard library only at import (torch is imported when a thread count is applied).
"""

from __future__ import annotations

import contextlib
import os

THREADS_ENV = "HEADCT_THREADS"
#: Below this many floating-point operations per call, one thread is faster than several (see above).
SMALL_WORK_FLOPS = 2e9


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def requested_threads(threads: int | str | None = None) -> int | None:
    """The explicit thread count (``threads``, else $HEADCT_THREADS), or None to choose by work size.

    Raises ValueError naming the setting when it is not a whole number >= 0 or "auto"."""
    where = "--threads"
    if threads is None:
        threads = os.environ.get(THREADS_ENV, "").strip() or None
        where = f"${THREADS_ENV}"
    if threads is None or str(threads).strip().lower() in ("", "0", "auto"):
        return None
    try:
        count = int(str(threads).strip())
    except ValueError:
        count = -1
    if count < 1:
        raise ValueError(f"{where}={threads!r} is not a thread count; give a whole number >= 1, or 0 / auto to "
                         "let HeadCTMoLRE choose by work size")
    return count


def threads_for_work(flops_per_call: float, threads: int | str | None = None) -> int:
    """Threads for work of ``flops_per_call`` floating-point operations per call (see the module doc)."""
    explicit = requested_threads(threads)
    if explicit is not None:
        return explicit
    return 1 if flops_per_call < SMALL_WORK_FLOPS else available_cores()


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``torch.set_num_threads(count)``, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
