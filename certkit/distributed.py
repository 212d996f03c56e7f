"""torchrun / DistributedDataParallel set-up, written directly on ``torch.distributed`` (nanoGPT style).

``torchrun --nproc-per-node K -m certkit train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; certkit then
joins the process group (NCCL on GPUs, gloo on CPU), the trainer wraps the model in
DistributedDataParallel and gives each rank a disjoint share of every epoch's permutation, and rank 0 alone
logs and writes checkpoints. ``certkit certify`` under torchrun certifies the rank's shard and rank 0 merges.
Multi-node: run the same torchrun command on every node with ``--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT``.

torchrun parses abbreviated options even after the script's name, so two certkit spellings collide with
its own: write ``--N`` (not ``--n``, which abbreviates ``--nnodes``, ``--nproc-per-node``, ...) and
``--max-index`` (not ``--max``, which abbreviates ``--max-restarts``)::

    torchrun --standalone --nproc-per-node 2 -m certkit certify RUN --N 100000 --max-index 500 --out r.tsv
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env() -> bool:
    """Join the process group when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
