"""A pool of gloo ranks for multi-process tests: spawned once per world size, reused by every test.

``RankPool(world, env)`` sets ``env`` in every rank before torch is imported there (``TRITON_INTERPRET=1``
runs the Triton kernels on CPU). ``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank
(``fn`` must be a module-level function) and returns the per-rank results. A rank that raises makes ``run``
raise with that rank's traceback; a rank that hangs (say, in a collective its peers never join) makes ``run``
raise after ``timeout`` seconds. Either way the pool is torn down and the next ``run`` starts a fresh one.
"""

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback

COLLECTIVE_TIMEOUT_S = 60


class RankFailure(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, env, tasks, results):
    os.environ.update(env)  # before torch and triton are imported: TRITON_INTERPRET is read at kernel definition
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share 2 cores; oversubscription makes gloo tests crawl
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, env=None):
        self.world_size = world_size
        self.env = dict(env or {})
        self._procs = []

    def _start(self):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker,
                                   args=(r, self.world_size, port, self.env, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 300.0):
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args))
        return self._collect(timeout)

    def _collect(self, timeout: float):
        out = [None] * self.world_size
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for _ in range(self.world_size):
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = self._results.get(timeout=max(left, 0.1))
            except queue.Empty:
                self.close()
                raise RankFailure(f"ranks did not finish within {timeout:.0f} s") from None
            if not ok:
                self.close()
                raise RankFailure(f"rank {rank} of {self.world_size} failed:\n{value}")
            out[rank] = value
        return out

    def close(self):
        for p in self._procs:
            p.kill()
            p.join(5)
        self._procs = []
