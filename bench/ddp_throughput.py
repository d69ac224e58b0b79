"""Data-parallel training throughput (lesions/s, patient bags/s) against the number of ranks, and
how far a per-rank Cox loss would move the gradient.

Throughput: the default training step (``psma_lib.train.Trainer``: patient bags, Cox loss on the
summed lesion hazards, auxiliary lesion targets, batched augmentation) of the imaging ResNet-18 on
2D axial planes of 48 mm / 2 mm crops (2 x 24 x 24), a random crop set of patients with 1-6
lesions. ``--ranks 1,2``: 1 is the plain single process; more ranks are DistributedDataParallel
processes on this machine (gloo on CPU, NCCL with one GPU per rank), started here with
``torch.multiprocessing`` and torchrun's environment variables, each global batch split over them.
Every figure is per global step: all ranks together.

Gradient: for a few global batches split over 2 ranks, the relative difference
``|g_per_rank - g| / |g|`` between the single-process gradient ``g`` of the global batch (what the
DDP step computes) and the average of per-rank loss gradients (each rank's Cox risk sets and
auxiliary mean over its own patients only), with BatchNorm over the global batch and per rank.

    python bench/ddp_throughput.py                       # CPU, gloo, 1 thread per rank
    python bench/ddp_throughput.py --device cuda --ranks 1,2 --steps 50
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from psma_lib import distributed
from psma_lib.models import SurvivalModel
from psma_lib.train import SurvivalData, TrainConfig, Trainer, _batch_loss, _score, resolve_device

PLANE = (2, 24, 24)  # 48 mm at 2 mm


def synthetic_set(n_patients: int, seed: int = 0) -> SurvivalData:
    """Random crops in physical units: 1-6 lesions per patient, ~60 % events, aux targets."""
    g = torch.Generator().manual_seed(seed)
    per_patient = torch.randint(1, 7, (n_patients,), generator=g)
    lesion_patient = torch.arange(n_patients).repeat_interleave(per_patient)
    n = len(lesion_patient)
    images = torch.rand(n, *PLANE, generator=g)
    images[:, 0] *= 30.0                       # SUV
    images[:, 1] = images[:, 1] * 1500 - 500   # HU
    return SurvivalData(time=torch.rand(n_patients, generator=g) * 40 + 1,
                        event=(torch.rand(n_patients, generator=g) < 0.6).long(), images=images,
                        lesion_patient=lesion_patient, lesion_targets=torch.randn(n, 2, generator=g))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    with distributed.launched(args.device) as ctx:
        device = ctx.device
        data = synthetic_set(args.patients).to(device)
        torch.manual_seed(0)
        model = SurvivalModel("imaging", "resnet18", n_aux=2).to(device)
        trainer = Trainer(model, data, TrainConfig(batch_size=args.batch_size, progress=False), seed=0)
        timed = []
        while len(timed) < args.steps:
            timed += trainer.epoch_batches()
        timed = timed[:args.steps]
        for idx in timed:  # untimed pass over the same batches: cuDNN autotunes each new bag shape once
            trainer.step(idx)
        lesions = sum(int(trainer.batches.lesion_counts(idx).sum()) for idx in timed)
        _sync(device)
        distributed.barrier()
        t0 = time.perf_counter()
        for idx in timed:
            loss = trainer.step(idx)
        _sync(device)
        distributed.barrier()
        seconds = time.perf_counter() - t0
        if ctx.rank == 0:
            assert torch.isfinite(loss), "non-finite training loss"
            queue.put((lesions / seconds, len(timed) * trainer.batch_size / seconds, trainer.notes, str(device)))


def throughput(world: int, args) -> tuple:
    with socket.socket() as s:  # a free port for this run's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, port, args, queue), nprocs=world, join=True)
    return queue.get()


def gradient_difference(batch_size: int, n_batches: int, n_ranks: int = 2) -> tuple[float, float]:
    """Mean over ``n_batches`` global batches of |g_per_rank - g| / |g|: (BatchNorm over the global
    batch, BatchNorm per rank). One process; no augmentation or dropout, so only the loss differs."""
    data = synthetic_set(4 * batch_size, seed=1)
    torch.manual_seed(0)
    model = SurvivalModel("imaging", "resnet18", n_aux=2, dropout=0.0)
    config = TrainConfig(batch_size=batch_size, augment=False, progress=False)
    trainer = Trainer(model, data, config, seed=0)
    model.train()

    def grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    out = []
    for idx in trainer.epoch_batches()[:n_batches]:
        whole = trainer.batches.inputs(idx)
        parts = [trainer.batches.inputs(shard) for shard in idx.tensor_split(n_ranks)]
        lesions = distributed.shard_lesions(trainer.batches.lesion_counts(idx), n_ranks)
        starts = [sum(lesions[:r]) for r in range(n_ranks)]
        g = grad(trainer._eager_loss(whole))
        emb = model.encoder(whole.images)  # one pass: BatchNorm statistics of the global batch
        g_bn = grad(sum(_batch_loss(*_score(model, emb[a:a + n], b, config.aggregation), b, config.aux_weight)
                        for a, n, b in zip(starts, lesions, parts, strict=True)) / n_ranks)
        g_plain = grad(sum(trainer._eager_loss(b) for b in parts) / n_ranks)
        out.append((float((g_bn - g).norm() / g.norm()), float((g_plain - g).norm() / g.norm())))
    return tuple(sum(v) / len(out) for v in zip(*out, strict=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--patients", type=int, default=128, help="size of the random crop set")
    p.add_argument("--batch-size", type=int, default=16, help="patients per global batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CPU / 50 GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--gradient-batches", type=int, default=4, help="batches for the gradient comparison (0: skip)")
    args = p.parse_args(argv)
    on_gpu = resolve_device(args.device).type == "cuda"
    args.steps = args.steps or (50 if on_gpu else 10)
    name = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({os.cpu_count()} cores), {args.threads} thread(s) per rank"
    print(f"device: {name}; torch {torch.__version__}; ResNet-18 2D {'x'.join(map(str, PLANE))}, patient bags "
          f"of 1-6 lesions, global batch {args.batch_size} patients; {args.steps} timed steps after an untimed "
          f"pass over them; load average {os.getloadavg()[0]:.2f} before (shared machine if high)")
    base = None
    for world in (int(r) for r in args.ranks.split(",")):
        lesions_s, bags_s, notes, device = throughput(world, args)
        base = base or lesions_s
        kind = "single process" if world == 1 else f"DDP, {world} ranks"
        print(f"{kind:16s} {lesions_s:9.1f} lesions/s {bags_s:8.1f} patient bags/s | x{lesions_s / base:4.2f} "
              f"| {device} | load average {os.getloadavg()[0]:.2f}")
        for note in notes:
            print(f"  note: {note}")
    if args.gradient_batches:
        torch.set_num_threads(args.threads)
        for batch_size in (16, 32):
            bn_global, bn_rank = gradient_difference(batch_size, args.gradient_batches)
            print(f"per-rank loss over 2 ranks, global batch {batch_size} patients: |g_per_rank - g| / |g| = "
                  f"{100 * bn_global:.0f} % (BatchNorm over the global batch), {100 * bn_rank:.0f} % "
                  f"(BatchNorm per rank); mean of {args.gradient_batches} batches")


if __name__ == "__main__":
    main()
