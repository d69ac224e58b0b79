"""Training across processes (``torchrun``): the process group from torchrun's environment,
rank-0 helpers, and the pieces that make a data-parallel step give exactly the single-process
gradient of one global batch (docs/SCALING.md, section "DDP").

Why not the usual per-rank loss: the Cox partial likelihood is not a sum over samples. Each event
is compared with its whole risk set, so the mean of per-rank losses (each rank's risk sets holding
only its own patients) is a different objective with a different gradient. The data-parallel step
of :class:`psma_lib.train.Trainer` therefore

1. splits each global batch of patients into contiguous shards, one per rank (a patient's lesions
   stay on one rank);
2. runs the image encoder on the rank's shard and gathers the lesions' embeddings of all ranks with
   the differentiable :func:`all_gather_rows` (in global batch order);
3. computes the rest of the model (clinical fusion, head, dropout, lesion aggregation or attention
   pooling, auxiliary head) and the loss -- Cox over the global batch plus the auxiliary mean over
   the global batch's lesions -- identically on every rank.

Gradient bookkeeping: every rank computes the same scalar ``L``. The backward of a differentiable
all-gather returns to each rank the *sum* over ranks of the gradients of the gathered rows, so the
encoder's parameters on rank ``r`` receive ``R * dL/dθ`` restricted to rank ``r``'s lesions;
``DistributedDataParallel`` averages over the ``R`` ranks, which gives exactly ``dL/dθ`` (the
single-process gradient). The head's parameters see no gather: each rank gets the full ``dL/dθ``
and the average of ``R`` equal values is the same. BatchNorm: training-mode statistics must be the
global batch's too (:func:`sync_batchnorm`).

>>> world_size(), rank(), is_main()    # no process group: one process is the whole world
(1, 0, True)
>>> broadcast_values([1.5, 2.0])       # without a process group a broadcast is the identity
[1.5, 2.0]
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on rank 0, the rank that decides (model selection) and writes every output."""
    return rank() == 0


def local_world_size() -> int:
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1


def _environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [name for name in ENV_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


@contextlib.contextmanager
def launched(device: str = "auto") -> Iterator[Context]:
    """The process group of a ``torchrun`` launch for the duration of the block.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and torchrun's ``MASTER_ADDR`` /
    ``MASTER_PORT``); with ``WORLD_SIZE`` > 1 it initialises the default process group -- NCCL on
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA (``auto`` and a GPU present), gloo on CPU -- and
    destroys it on exit (after a barrier when the block succeeded). Without torchrun it yields a
    single-process context and initialises nothing.

    Args:
        device: the run's device setting (``auto``, ``cpu``, ``cuda``).

    Returns:
        A context manager yielding this process's :class:`Context`.
    """
    env = _environment()
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if env is None or active():  # single process, or a group the caller already made
        yield Context(rank(), world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                      dist.get_backend() if active() else None, torch.device("cuda" if use_cuda else "cpu"))
        return
    rank_, size, local = env
    if use_cuda and ":" in device:
        raise InputError(f"device {device!r} under torchrun: each rank takes cuda:LOCAL_RANK, so give "
                         "--device cuda (or auto)")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        device_ = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank_, world_size=size, device_id=device_)
    else:
        device_ = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank_, world_size=size)
    ok = False
    try:
        yield Context(rank_, size, local, dist.get_backend(), device_)
        ok = True
    finally:
        if ok:
            dist.barrier()  # nobody tears the group down while another rank still talks to it
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_values(values: Sequence[float], src: int = 0) -> list[float]:
    """Rank ``src``'s ``values`` on every rank (float64; the identity without a process group).

    Used for rank 0's decisions (best epoch, early stop, which folds are left) so that every rank
    follows them.
    """
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src)
    return t.cpu().tolist()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if active():
        dist.barrier()


def all_gather_rows(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Differentiable concatenation, in rank order, of every rank's ``x`` (rank ``r`` holds
    ``counts[r]`` rows; all ranks pass the same ``counts``).

    Rows are padded to the largest count for the collective and the padding dropped again. The
    backward returns to each rank the sum over ranks of the gradients of its rows (see the module
    docstring for why that sum is what a data-parallel step needs).
    """
    if not active():
        return x
    if len(counts) != world_size() or x.shape[0] != counts[rank()]:
        raise ValueError(f"rank {rank()} holds {x.shape[0]} rows; counts {list(counts)}")
    size = max(counts)
    if x.shape[0] < size:
        x = torch.cat([x, x.new_zeros(size - x.shape[0], *x.shape[1:])])
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; the same in every torch >= 2.2
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's, over every rank, on CPU.

    ``torch.nn.SyncBatchNorm`` refuses CPU input (``ValueError: SyncBatchNorm expected input
    tensor to be on GPU...``; its kernels ``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``
    ... have no CPU implementation). This module gathers each rank's count, mean and sum of squared
    deviations with :func:`all_gather_rows` (differentiable), combines them exactly (Chan et al.)
    and normalises with the global mean and biased variance; running statistics are updated with
    the unbiased global variance, as ``F.batch_norm`` does. Same parameters and buffers (state-dict
    keys) as the BatchNorm it replaces; in eval mode or without a process group it is plain
    BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        mean = x.mean(dims)
        m2 = (x - mean.view(shape)).square().sum(dims)
        local = torch.cat([mean, m2, mean.new_full((1,), x.numel() // c)]).unsqueeze(0)
        stats = all_gather_rows(local, [1] * world_size())  # [R, 2C + 1]
        n = stats[:, -1:]
        total = n.sum()
        g_mean = (n * stats[:, :c]).sum(0) / total
        var = (stats[:, c:2 * c] + n * (stats[:, :c] - g_mean).square()).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(g_mean, factor)
                self.running_var.lerp_(var * total / (total - 1), factor)
        y = (x - g_mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace ``module``'s BatchNorm layers in place by their global-batch versions:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on CPU. The new layers share the
    old ones' parameters and buffers. Returns ``module``.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


def shard_lesions(lesions: torch.Tensor, n_ranks: int) -> list[int]:
    """How a global batch is split: unit ``i`` of the batch (a patient, or a lesion) has
    ``lesions[i]`` lesions and the ranks take contiguous runs of units whose lengths differ by at
    most one, so a patient's lesions stay on one rank. Returns the lesions per rank.

    >>> shard_lesions(torch.tensor([2, 1, 3, 1, 1]), 2)   # patients 0-2 on rank 0, 3-4 on rank 1
    [6, 2]
    """
    return [int(part.sum()) for part in lesions.tensor_split(n_ranks)]
