"""Which CPUs the server's threads run on (`--pin-threads`).

A unary RPC crosses between gRPC's poller thread and the event loop four times (one wake-up per
completed operation). When the scheduler puts the two on different CPUs, each crossing is a
cross-CPU wake-up, which on a virtual machine is an interrupt through the hypervisor; on one CPU
the woken thread simply runs when the other one blocks. So the loop and the poller share one
CPU, the *front*, and the threads that compute (the model instances' batch threads, the worker
pool behind `asyncio.to_thread`: loading, explanations) run on the others, the *back*, where
they neither preempt the loop nor lose their caches to it.

CPU affinity belongs to the process, and so does this module's state: `pin_front` pins the
calling thread (the one that will run the event loop, before gRPC starts its poller thread, which
inherits the CPU), and from then on `enter_back` moves whichever thread calls it to the back.

`name_grpc_poller` gives gRPC's poller thread a name the OS shows (`top -H`: `grpc_poller`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# `auto` pins only where the CPUs are, in effect, the server's own: a small machine or cpuset
# (larger shared hosts: other processes may pin to the same first CPUs), one server process (the
# workers would all pick the same CPUs), one ONNX Runtime thread per session (more want several
# back CPUs each).
AUTO_MAX_CPUS = 4
MODES = ("auto", "on", "off")

log = logging.getLogger(__name__)

_back: frozenset[int] | None = None  # set by pin_front: where computing threads go

# grpc.aio starts one Python thread that polls gRPC's completion queue; Python names it after its
# target function.
GRPC_POLLER_SUFFIX = "(_poll_wrapper)"
GRPC_POLLER_OS_NAME = "grpc_poller"
OS_NAME_MAX = 15  # Linux keeps 15 bytes of a thread's name


@dataclass(frozen=True)
class Placement:
    """The front CPU (event loop, gRPC poller) and the back CPUs (everything that computes)."""

    front: int
    back: frozenset[int]

    def describe(self) -> str:
        back = ",".join(str(c) for c in sorted(self.back))
        return (
            f"event loop and gRPC poller on CPU {self.front}, model instances and worker threads "
            f"on CPU {back}"
        )


def plan(
    mode: str, *, workers: int, intra_op_threads: int, cpus: Sequence[int] | None = None
) -> Placement | None:
    """The placement for `mode` on `cpus` (default: the CPUs this process may use); None: the
    scheduler places every thread (off, one CPU, several workers, or `auto` not applying)."""
    if mode not in MODES:
        raise ValueError(f"pin_threads: expected one of {', '.join(MODES)}")
    allowed = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if mode == "off" or len(allowed) < 2 or workers > 1:
        return None
    if mode == "auto" and (len(allowed) > AUTO_MAX_CPUS or intra_op_threads > 1):
        return None
    return Placement(allowed[0], frozenset(allowed[1:]))


def pin_front(placement: Placement) -> bool:
    """Pin the calling thread, and so every thread it starts from now on, to the front CPU;
    threads that compute move themselves with `enter_back`. False (and nothing changed) where
    the system refuses (a sandbox without sched_setaffinity, a CPU taken away meanwhile)."""
    global _back
    try:
        os.sched_setaffinity(0, {placement.front})
    except OSError as exc:
        log.warning("threads left to the OS: cannot pin to CPU %d (%s)", placement.front, exc)
        return False
    _back = placement.back
    return True


def enter_back() -> None:
    """Move the calling thread to the back CPUs (nothing when no placement is in force, or when
    the system refuses: the thread then runs where it is, and the log says so)."""
    if _back is not None:
        try:
            os.sched_setaffinity(0, _back)
        except OSError as exc:
            log.warning("a thread stays on the event loop's CPU: %s", exc)


def back_cpus() -> frozenset[int] | None:
    """The back CPUs under a placement (for processes that compute), None when none is in
    force."""
    return _back


def worker_pool() -> ThreadPoolExecutor | None:
    """The event loop's default executor under a placement (its threads start on the back CPUs);
    None when none is in force."""
    return None if _back is None else ThreadPoolExecutor(initializer=enter_back)


def name_grpc_poller() -> list[int]:
    """Name gRPC's poller thread(s) `grpc_poller` where the OS shows threads; their native ids."""
    named = []
    for thread in threading.enumerate():
        if thread.name.endswith(GRPC_POLLER_SUFFIX) and thread.native_id is not None:
            name_os_thread(GRPC_POLLER_OS_NAME, thread.native_id)
            named.append(thread.native_id)
    return named


def name_os_thread(name: str, tid: int | None = None) -> None:
    """Give a thread of this process (default: the calling one) `name` where `top -H`, `ps -L`
    and /proc show it (Linux; Python 3.11 names threads for itself only). A long
    `model:version-instance` loses the end of the model's name, not the version and instance."""
    cut = name.rfind(":") if ":" in name else name.rfind("-")
    tail = name[cut:] if cut > 0 and len(name) - cut < OS_NAME_MAX else ""
    short = name[: OS_NAME_MAX - len(tail)] + tail if len(name) > OS_NAME_MAX else name
    try:
        with open(f"/proc/self/task/{tid or threading.get_native_id()}/comm", "w") as comm:
            comm.write(short)
    except OSError:  # not Linux, or /proc not mounted: the name is cosmetic
        pass
