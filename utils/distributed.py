"""Process-group helpers: one process without a launcher, or one per rank under `torchrun`.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); multi-node runs use
torchrun's own flags (--nnodes, --node_rank, --rdzv_endpoint). The backend is NCCL on CUDA and gloo
on CPU.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """--device auto (CUDA when available, else CPU), cpu or cuda; ValueError when CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine; use --device cpu")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    """
    device = resolve_device(device).type
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://",
                                **({"device_id": dev} if device == "cuda" else {}))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main_rank(fn, is_main: bool):
    """fn() on rank 0 (None on the other ranks); a UserError it raises is raised on every rank, so that no
    rank goes on to wait for the others, and reported once (`every_rank`)."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    error = all_gather_object(error)[0]
    if error:
        raise UserError(error, every_rank=True)
    return result


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place); a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank (every rank gets the same answer)."""
    t = torch.tensor([float(flag)], device=device)
    return bool(all_reduce_sum(t).item() > 0)
