"""Where cells run: ``local`` (one worker per visible GPU, or the CPU) or ``ray`` (a cluster).

An executor takes the cells still to do and calls ``on_result(record)`` in the driver as each one
finishes, so ``OUT/cells.jsonl`` grows while the bench runs. Every worker writes its run directory
itself, into OUT, which must therefore be a directory all nodes share.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Callable, Sequence

import torch

from mvsdi.bench.cells import EvalSettings, FatalBenchError, run_cell
from mvsdi.bench.matrix import Cell

OnResult = Callable[[dict[str, Any]], None]
RAY_CONNECT_TIMEOUT_S = 10.0
SPREAD_DEVICES = ("auto", "cuda")  # devices that mean "a GPU": each worker gets its own


# ---------------------------------------------------------------------------------------------
# local


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def _pin_gpu(gpu: str) -> None:
    # runs first in a fresh (spawned) worker, before torch initialises CUDA there
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _gpu_worker(gpu: str) -> ProcessPoolExecutor:
    """A one-process pool that sees only ``gpu``; spawned, since a forked process cannot use CUDA."""
    return ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_pin_gpu, initargs=(gpu,))


def _crashed(cell: Cell, exc: BaseException) -> dict[str, Any]:
    return {"cell": cell.key, "status": "failed", "attempts": 1, "error": f"the worker process died: {exc!r}"}


def run_local(cells: Sequence[Cell], settings: EvalSettings, retries: int, on_result: OnResult,
              gpus: Sequence[str] | None = None) -> None:
    """One worker process per GPU (default: the visible ones), each seeing only its GPU. With no GPU,
    or a device other than auto/cuda (cpu, or one chosen GPU cuda:N), the cells run one after
    another in this process."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    if not gpus or any(c.config.device not in SPREAD_DEVICES for c in cells):
        for cell in cells:
            on_result(run_cell(cell, settings, retries))
        return
    todo = list(cells)
    pools = {gpu: _gpu_worker(gpu) for gpu in gpus}
    running: dict[Future, tuple[str, Cell]] = {}

    def submit(gpu: str) -> None:
        if todo:
            cell = todo.pop(0)
            running[pools[gpu].submit(run_cell, cell, settings, retries)] = (gpu, cell)

    try:
        for gpu in gpus:
            submit(gpu)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                gpu, cell = running.pop(future)
                try:
                    on_result(future.result())
                except BrokenProcessPool as exc:  # killed (e.g. out of memory): record it, start a new worker
                    on_result(_crashed(cell, exc))
                    pools[gpu] = _gpu_worker(gpu)
                submit(gpu)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Ray


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--executor ray needs Ray, which is not installed: pip install 'mvsdi[ray]'") from exc
    return ray


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout_s`` when nothing listens at a host:port Ray address.

    ``ray.init`` itself keeps retrying an address that does not answer for minutes (measured with
    Ray 2.60: still waiting after 120 s), so the address is probed first.
    """
    if address in ("local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address {address!r}: write HOST:PORT (the head's GCS port, 6379 by default), "
                         "ray://HOST:PORT (Ray Client), 'auto' (the cluster this node belongs to) or 'local'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` on the "
                         "head node and give its address, or use --executor local") from exc


def connect_ray(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S):
    """Import Ray and join the cluster at ``address`` ('local' starts a private one on this machine)."""
    ray = import_ray()
    check_reachable(address, timeout_s)
    if not ray.is_initialized():
        try:
            if address == "local":  # always a new private instance (not a `ray start` cluster of this
                # machine, as a plain ray.init() would join), without a dashboard (seconds of start-up)
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ValueError(f"cannot join the Ray cluster at {address}: {exc}. If the cluster uses token "
                             "authentication (on by default for `ray start` from Ray 2.59), set RAY_AUTH_MODE=token "
                             "here too, with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from exc
    return ray


def run_ray(cells: Sequence[Cell], settings: EvalSettings, retries: int, on_result: OnResult, address: str) -> None:
    """One Ray task per cell: one GPU each when the cluster has GPUs, else one CPU."""
    ray = connect_ray(address)
    use_gpus = ray.cluster_resources().get("GPU", 0) > 0 and all(c.config.device in SPREAD_DEVICES for c in cells)
    # max_retries=0: a failing cell is retried inside run_cell; a dead worker is recorded as failed below
    task = ray.remote(num_gpus=1 if use_gpus else 0, num_cpus=1, max_retries=0)(run_cell)
    running = {task.remote(cell, settings, retries): cell for cell in cells}
    try:
        while running:
            finished, _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(finished[0])
            try:
                on_result(ray.get(finished[0]))
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, FatalBenchError):  # run_cell raises nothing else on purpose
                    raise FatalBenchError(str(exc.cause)) from None
                on_result(_crashed(cell, exc))
            except ray.exceptions.RayError as exc:  # the worker or its node died
                on_result(_crashed(cell, exc))
    finally:
        for ref in running:  # Ctrl-C or a fatal error: do not leave cells running on the cluster
            ray.cancel(ref)
