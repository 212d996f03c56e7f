"""torchrun / DistributedDataParallel set-up, written directly on ``torch.distributed`` (nanoGPT style).

``torchrun --nproc-per-node K -m certkit train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; certkit then
joins the process group (NCCL on GPUs, gloo on CPU), the trainer wraps the model in
DistributedDataParallel and gives each rank a disjoint share of every epoch's permutation, and rank 0 alone
logs and writes checkpoints. ``certkit certify`` under torchrun certifies the rank's shard and rank 0 merges.
Multi-node: run the same torchrun command on every node with ``--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT``.

torchrun parses abbreviated options even after the script's name, so ``--n`` (an abbreviation of
``--nnodes``, ``--nproc-per-node``, ...) and ``--max`` (of ``--max-restarts``) are taken as its own. Put
``--`` after ``-m certkit`` and torchrun passes everything after it to certkit untouched; or spell them
``--N`` and ``--max-index``, which torchrun cannot mistake::

    torchrun --standalone --nproc-per-node 2 -m certkit -- certify RUN --n 100000 --max 500 --out r.tsv
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from certkit.errors import CertkitError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def uses_cuda(device: str) -> bool:
    """Whether a ``--device`` value puts this process on a GPU (``auto`` does when CUDA is present)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun with more than one process.

    The backend follows the device the ranks compute on, not what the machine has: NCCL for CUDA ranks, gloo
    for ``--device cpu`` even on a GPU machine (NCCL cannot reduce CPU tensors). CUDA ranks each take the GPU
    of their LOCAL_RANK, so more local ranks than GPUs is refused before anything is placed on a device
    that does not exist.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if not uses_cuda(device):
        dist.init_process_group("gloo")
        return True
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= gpus:
        raise CertkitError(
            f"torchrun started local rank {local_rank} but this machine has {gpus} GPU(s): use "
            f"--nproc-per-node {gpus} or less, or --device cpu"
        )
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
