"""A persistent pool of gloo ranks on CPU, for multi-rank tests and benchmarks (imports cost ~8 s
per process: pay once).

``pool.run("package.module:function", **kwargs)`` calls ``function(rank, world_size, **kwargs)`` on
every rank and returns the per-rank results; an exception on any rank fails the call with that
rank's traceback. After each call the ranks tear down Megatron's model-parallel state.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import socket
import sys
import traceback
import warnings

import torch.multiprocessing as mp

# The directory holding the package (a checkout's root): workers import targets from there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    from micromoe_megatron.mcore import cpu_compat, megatron_fixes

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)  # Megatron's INFO lines (buckets, configs) drown the test output
    warnings.simplefilter("ignore", FutureWarning)  # torch/megatron deprecation notices, not ours
    cpu_compat.apply()
    megatron_fixes.apply()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron.core import parallel_state

    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test session died without closing the pool
                break
            continue
        if task is None:
            break
        target, kwargs = task
        try:
            module, name = target.split(":")
            result = getattr(importlib.import_module(module), name)(rank, world_size, **kwargs)
            results.put((rank, True, result))
        except BaseException:  # report everything; the test decides
            results.put((rank, False, traceback.format_exc()))
        finally:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            _release_groups()
    dist.destroy_process_group()


def _release_groups() -> None:
    """Free every process group but the world. destroy_model_parallel() only forgets Megatron's
    groups; their gloo contexts and TCP threads would otherwise pile up test after test. (After a
    Megatron DDP model some still survive; tests/conftest.py restarts the pool per test module for that.)"""
    import gc

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        if group is not distributed_c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()  # a group's threads stop when its last reference (models, optimizers) is gone


class RankPool:
    """``world_size`` spawned gloo ranks that run ``module:function`` targets until ``close()``.

    Args:
        max_tasks: restart the ranks after this many tasks (None: never). Every task that builds a
            Megatron DDP model leaves gloo threads behind (~70 per rank here); hundreds of idle ones
            load a 2-core machine noticeably, so long test modules recycle their ranks.
    A pool broken by a hang restarts before its next task instead of failing every later one.
    """

    def __init__(self, world_size: int = 4, timeout_s: float = 600.0, max_tasks: int | None = None):
        self.world_size, self.timeout_s, self.max_tasks = world_size, timeout_s, max_tasks
        self._start()

    def _start(self) -> None:
        # Not daemonic: Megatron's checkpoint writer starts helper processes. Workers exit on
        # close() or when they notice their parent is gone.
        world_size = self.world_size
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        port = _free_port()
        self._procs = [context.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results),
                                       daemon=False) for r in range(world_size)]
        for proc in self._procs:
            proc.start()
        self.broken = False
        self.tasks_run = 0

    def run(self, target: str, **kwargs) -> list:
        if self.broken or (self.max_tasks and self.tasks_run >= self.max_tasks):
            self.close()
            self._start()
        self.tasks_run += 1
        for q in self._tasks:
            q.put((target, kwargs))
        results, failures = [None] * self.world_size, []
        for _ in range(self.world_size):
            # Once a rank has failed, the others may be stuck in a collective: report it soon.
            timeout = 20.0 if failures else self.timeout_s
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                detail = "\n".join(failures)
                raise TimeoutError(f"{target}: a rank did not answer within {timeout} s\n{detail}")
            if ok:
                results[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
        if failures:
            raise AssertionError(f"{target} failed:\n" + "\n".join(failures))
        return results

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
