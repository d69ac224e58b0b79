"""Training throughput (lesions/s): a plain DataLoader loop vs the fast path, side by side.

(a) baseline: crops as CPU tensors, a ``Dataset`` that augments one sample at a time, a
    ``DataLoader`` (pinned memory + 4 workers on GPU), float32 eager train step;
(b) fast path: ``psma_lib.train.Trainer`` -- crops resident on the device, batched on-device
    augmentation, and on GPU bf16 autocast + cudnn autotuning; with lesion units a
    CUDA-graph-captured step;
(c) the default training: the same Trainer with patient units (bags of 4 lesions, Cox loss on the
    aggregated patient risk; eager, since bag shapes are not static).
All: Cox loss (Efron), AdamW, the imaging model with the given backbone, 64 lesions per step.

    python bench/train_throughput.py                       # CPU or GPU, resnet18 2D + r3d_18
    python bench/train_throughput.py --device cuda --steps 100 --backbones resnet18
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from psma_lib.cox import neg_partial_log_likelihood
from psma_lib.models import SurvivalModel
from psma_lib.train import SurvivalData, TrainConfig, Trainer, augment_batch, resolve_device

TARGETS = {  # lesions/s (printed beside the measurement, not asserted)
    ("cuda", "resnet18"): 15000, ("cuda", "r3d_18"): 2500, ("cpu", "resnet18"): 140,
}
SHAPES = {"resnet18": (2, 64, 64), "resnet34": (2, 64, 64), "resnet50": (2, 64, 64), "r3d_18": (2, 32, 32, 32)}


class AugmentingDataset(Dataset):
    """The classic pattern: index -> one augmented sample (a Python call per lesion)."""

    def __init__(self, images, time_, event, seed):
        self.images, self.time, self.event = images, time_, event
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = augment_batch(self.images[i:i + 1], self.generator)[0]
        return x, self.time[i], self.event[i]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_baseline(backbone, images, time_, event, device, steps, warmup, batch):
    model = SurvivalModel("imaging", backbone).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    on_gpu = device.type == "cuda"
    loader = DataLoader(AugmentingDataset(images, time_, event, 0), batch_size=batch, shuffle=True,
                        drop_last=True, pin_memory=on_gpu, num_workers=4 if on_gpu else 0,
                        persistent_workers=on_gpu)
    model.train()
    done, t0 = 0, None
    while done < warmup + steps:
        for x, t, e in loader:
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            x, t, e = (v.to(device, non_blocking=True) for v in (x, t, e))
            optimizer.zero_grad(set_to_none=True)
            loss = neg_partial_log_likelihood(model(x), t, e)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def bench_fast(backbone, images, time_, event, device, steps, warmup, batch, channels_last, unit="lesion"):
    model = SurvivalModel("imaging", backbone).to(device)
    per_patient = 4 if unit == "patient" else 1  # lesion units: each lesion its own survival row
    lesion_patient = torch.arange(len(images)) // per_patient
    n_patients = int(lesion_patient[-1]) + 1
    data = SurvivalData(time_[:n_patients], event[:n_patients], None, images, lesion_patient).to(device)
    config = TrainConfig(batch_size=batch // per_patient, unit=unit, channels_last=channels_last, progress=False)
    trainer = Trainer(model, data, config, seed=0)
    batches = []
    while len(batches) < warmup + steps:
        batches += trainer.epoch_batches()
    for idx in batches[:warmup]:
        trainer.step(idx)
    _sync(device)
    t0 = time.perf_counter()
    for idx in batches[warmup:warmup + steps]:
        loss = trainer.step(idx)
    _sync(device)
    rate = steps * (batch // per_patient) * per_patient / (time.perf_counter() - t0)
    mode = "CUDA graph" if trainer.graphed is not None else "eager"
    return rate, mode, float(loss.detach()), trainer.notes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CPU / 100 GPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lesions", type=int, default=1024, help="size of the random crop set")
    p.add_argument("--backbones", default="resnet18,r3d_18")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC for 2D (default: on for GPU, off for CPU)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (100 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    channels_last = on_gpu if args.channels_last is None else args.channels_last
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {steps} timed steps "
          f"after {warmup} warm-up; load average {os.getloadavg()[0]:.2f} (shared machine if high)")
    for backbone in args.backbones.split(","):
        shape = SHAPES[backbone]
        g = torch.Generator().manual_seed(0)
        images = torch.rand(args.lesions, *shape, generator=g)
        images[:, 0] *= 30.0                      # SUV
        images[:, 1] = images[:, 1] * 1500 - 500  # HU
        time_ = torch.rand(args.lesions, generator=g) * 40 + 1
        event = (torch.rand(args.lesions, generator=g) < 0.6).long()
        base = bench_baseline(backbone, images, time_, event, device, steps, warmup, args.batch_size)
        fast, mode, loss, notes = bench_fast(backbone, images, time_, event, device, steps, warmup,
                                             args.batch_size, channels_last)
        bags, bag_mode, _, bag_notes = bench_fast(backbone, images, time_, event, device, steps, warmup,
                                                  args.batch_size, channels_last, unit="patient")
        target = TARGETS.get((device.type, backbone))
        label = "x".join(map(str, shape))
        print(f"{backbone:9s} {label:12s} DataLoader baseline {base:9.1f} lesions/s | fast path ({mode}"
              f"{', bf16' if on_gpu else ', fp32'}) {fast:9.1f} lesions/s | ratio {fast / base:5.2f}x"
              f" | target {'>= ' + str(target) if target else 'n/a'} lesions/s"
              f"{' and >= 3x' if on_gpu else ''} | final loss {loss:.3f}")
        print(f"{'':22s} default training, patient bags of 4 ({bag_mode}) {bags:9.1f} lesions/s")
        for note in dict.fromkeys(notes + bag_notes):
            print(f"  note: {note}")


if __name__ == "__main__":
    main()
