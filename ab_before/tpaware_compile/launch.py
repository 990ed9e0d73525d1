"""Start one process per tensor-parallel rank on this machine: NCCL over GPUs when there are enough,
gloo over CPU ranks otherwise. ``fn(rank, world, device, *args)`` runs in each, inside its process group."""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def use_cuda(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def launch(world: int, fn, *args, timeout_s: float = 300.0) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, timeout_s, fn, args), nprocs=world, join=True)


def _rank_main(rank, world, port, timeout_s, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = use_cuda(world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, device, *args)
        dist.barrier()  # no rank tears the group down while a peer still has collectives in flight
    finally:
        dist.destroy_process_group()
