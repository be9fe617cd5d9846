"""Multi-host helpers: `jax.distributed` start-up, work sharing and deterministic gathering.

Evaluation scales out as data parallelism across processes: every process builds the model and pool
on a mesh of its *local* devices (batch over `data`, weights over `model`), takes its share of the
examples (`share`), and the per-example results are gathered to every process in a fixed order
(`allgather_json`), so metrics do not depend on the number of processes. On CPU the collectives use
gloo (set before initialisation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from hilora_jax.errors import UsageError

ENV_VARS = ("HILORA_COORDINATOR", "HILORA_NUM_PROCESSES", "HILORA_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Start `jax.distributed` (gloo CPU collectives) when asked to; returns whether it started.

    One machine is the default: with no arguments and none of `HILORA_COORDINATOR`,
    `HILORA_NUM_PROCESSES`, `HILORA_PROCESS_ID` set, nothing happens. Arguments default to those
    variables; without `auto` all three are needed. `auto=True` (`hilora eval --multihost`) lets
    JAX detect the cluster (TPU pods, SLURM, ...) and fill in whatever was not given. A single
    process (`num_processes=1`) is a no-op.
    """
    coordinator = coordinator or os.environ.get("HILORA_COORDINATOR") or None
    num_processes = num_processes or _int_env("HILORA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("HILORA_PROCESS_ID")
    given = {"HILORA_COORDINATOR": coordinator, "HILORA_NUM_PROCESSES": num_processes,
             "HILORA_PROCESS_ID": process_id}
    if num_processes == 1:
        return False
    if not auto:
        if all(v is None for v in given.values()):
            return False  # one machine
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UsageError(f"multi-host evaluation needs all of {', '.join(ENV_VARS)}; "
                             f"{', '.join(missing)} not set (or pass --multihost to let JAX "
                             "detect the cluster)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"HILORA_PROCESS_ID={process_id} is not in 0..{num_processes - 1}")
    # only affects the CPU backend; must not query the backend before initialisation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


def _int_env(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"{name}={v!r} is not an integer") from None


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's share of `items` (round robin, so shares differ in size by at most one)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return list(items[index::count])


def allgather_json(obj) -> list:
    """Gather one JSON-serialisable object from every process; returns them in process order."""
    if process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([data.size], np.int64))))
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf))  # [P, n]
    out = []
    for row in everything.reshape(process_count(), n):
        out.append(json.loads(bytes(row).rstrip(b"\0").decode()))
    return out
