"""Where torch computes: one long-lived compute thread per process, other work in threads
that end.

PyTorch's CPU build runs its parallel kernels on OpenMP (GNU libgomp). libgomp gives every
thread that starts a parallel region its own pool of helper threads, kept until that thread
exits, and once the helpers of all pools outnumber the CPUs it stops letting idle helpers
spin between regions: they sleep, and waking them costs more than a small decode step's
kernels. So after the main thread has run torch (timing precisions, a dream in the chat),
the server's engine thread decodes at about half its speed for the rest of the process
(measured on a 2-core AMD EPYC, default model, int8, batch 1: 25.7 tokens/s in the main
thread, 12-15 in the engine thread afterwards, 25-27 when the earlier work ran in a thread
that had exited; docs/RESULTS.md, "The engine thread").

`run_in_thread` runs such work in a fresh thread that exits when it is done, which frees its
pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_thread(fn: Callable[[], T], name: str = "onthejob-compute") -> T:
    """fn() in a new thread that ends with it (its OpenMP pool freed): its result, or its
    exception raised here. Blocks until it is done."""
    result: list = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
