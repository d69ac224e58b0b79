"""One rank of the data-parallel gradient check (tests/test_distributed.py starts two with torchrun).

Every rank first computes, as one process (no process group yet), the gradient of one global
batch and the "per-rank loss" gradient (the mean over shards of each shard's own loss: what DDP
with a per-rank Cox loss would give); then it joins the process group and takes the same step
under DDP. Rank 0 writes the comparisons as JSON to the path given as the first argument.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT.json              # CPU, gloo
    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT.json --device cuda

On CUDA (float32: no bf16, no TF32) each rank takes its own GPU with NCCL; on a machine with fewer
GPUs than ranks every rank shares GPU 0 over gloo (a functional check of the CUDA path:
SyncBatchNorm, device placement). CUDA sums (cuDNN algorithms chosen per batch shape, atomic
``index_add``) differ at float level and non-smooth layers (ReLU, max-pooling) can turn that into
larger gradient differences. So on CUDA the single-process step is also taken with cuDNN's
deterministic algorithms instead of the autotuned ones (its distance from the autotuned step is
the noise floor against which the DDP step's distance is read), and the cases without
augmentation or dropout are compared with the same step on CPU. The CPU run is the test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist


def tiny_data(n_patients: int = 12, seed: int = 0):
    """Patients with 1-3 lesions (unequal shards), tied times across shards, NaN aux targets."""
    from psma_lib.train import SurvivalData

    g = torch.Generator().manual_seed(seed)
    per_patient = torch.randint(1, 4, (n_patients,), generator=g)
    lesion_patient = torch.arange(n_patients).repeat_interleave(per_patient)
    n = len(lesion_patient)
    time = (torch.rand(n_patients, generator=g) * 20 + 1).round()
    time[7] = time[1]  # a tie between patients that sit on different ranks
    targets = torch.randn(n, 2, generator=g)
    targets[::5, 1] = float("nan")
    return SurvivalData(time=time, event=(torch.rand(n_patients, generator=g) < 0.6).long(),
                        clinical=torch.randn(n_patients, 4, generator=g),
                        images=torch.rand(n, 2, 16, 16, generator=g) * 10,
                        lesion_patient=lesion_patient, lesion_targets=targets)


# name -> (SurvivalModel kwargs, TrainConfig kwargs, plain: no augmentation or dropout, so it is
# also compared with the per-rank loss and, on CUDA, with CPU)
CASES = {
    "bags_sum_aux": (dict(modality="multimodal", n_clinical=4, n_aux=2, dropout=0.0),
                     dict(batch_size=8, augment=False), True),
    "attention_augment_dropout": (dict(modality="imaging", attention=True, n_aux=2),
                                  dict(batch_size=8, augment=True), False),
    "lesion_units": (dict(modality="imaging"), dict(batch_size=10, unit="lesion", augment=True), False),
    "clinical_mlp": (dict(modality="clinical", n_clinical=4), dict(batch_size=8), False),
}


def _model(kwargs):
    from psma_lib.models import SurvivalModel

    torch.manual_seed(0)
    return SurvivalModel(backbone="resnet18", **kwargs)


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _step(model_kwargs, config_kwargs, data, other_cudnn: bool = False):
    """(loss, gradient, BatchNorm running means) of the first batch's step; DDP inside a group.
    ``other_cudnn``: cuDNN's deterministic algorithms instead of the autotuned ones (CUDA)."""
    from psma_lib.train import TrainConfig, Trainer

    model = _model(model_kwargs).to(data.time.device)
    config = TrainConfig(progress=False, bf16=False, cuda_graph=False, **config_kwargs)
    trainer = Trainer(model, data, config, seed=3)
    idx = trainer.epoch_batches()[0]
    torch.manual_seed(11)  # dropout draws from the global generator
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if other_cudnn:  # the Trainer switched autotuning on
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        loss = float(trainer.step(idx))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags
    running = [b.flatten() for n, b in model.named_buffers() if n.endswith("running_mean")]
    return loss, _grad(model), torch.cat(running) if running else torch.zeros(0), idx, trainer


def _per_rank(model_kwargs, config_kwargs, data, idx, n_ranks):
    """Mean over shards of each shard's own loss gradient (per-rank Cox risk sets and BatchNorm)."""
    from psma_lib.train import TrainConfig, Trainer

    model = _model(model_kwargs).to(data.time.device)
    config = TrainConfig(progress=False, bf16=False, cuda_graph=False, **config_kwargs)
    trainer = Trainer(model, data, config, seed=3)
    model.train()
    losses = []
    for shard in idx.tensor_split(n_ranks):
        loss = trainer._eager_loss(trainer.batches.inputs(shard)) / n_ranks
        loss.backward()
        losses.append(float(loss.detach()) * n_ranks)
    return sum(losses) / n_ranks, _grad(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.numel() else 0.0


@contextlib.contextmanager
def _process_group(device: torch.device):
    """torchrun's process group (psma_lib.distributed), or gloo with every rank on GPU 0 when the
    machine has fewer GPUs than ranks."""
    from psma_lib import distributed

    if device.type == "cpu" or torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"]):
        with distributed.launched(device.type) as ctx:
            yield ctx
        return
    dist.init_process_group("gloo")
    try:
        yield distributed.Context(dist.get_rank(), dist.get_world_size(), 0, "gloo", device)
    finally:
        dist.destroy_process_group()


def main(out: str, device_name: str = "cpu") -> None:
    torch.set_num_threads(1)
    if device_name == "cpu":
        torch.use_deterministic_algorithms(True)
        device = torch.device("cpu")
    else:
        local = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local if local < torch.cuda.device_count() else 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    data = tiny_data().to(device)
    single = {name: _step(m, c, data) for name, (m, c, _) in CASES.items()}
    per_rank = {name: _per_rank(m, c, data, single[name][3], 2) for name, (m, c, pr) in CASES.items() if pr}
    on_cpu = {} if device.type == "cpu" else \
        {name: _step(m, c, data.to(torch.device("cpu")))[1].to(device) for name, (m, c, pr) in CASES.items() if pr}
    other = {} if device.type == "cpu" else {name: _step(m, c, data, other_cudnn=True)[1] for name, (m, c, _) in CASES.items()}
    report = {}
    with _process_group(device) as ctx:
        for name, (m, c, _) in CASES.items():
            loss, grad, running, idx, trainer = _step(m, c, data)
            ref_loss, ref_grad, ref_running, ref_idx, _ = single[name]
            spread = grad.clone()
            torch.distributed.all_reduce(spread, torch.distributed.ReduceOp.MAX)
            low = grad.clone()
            torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
            report[name] = {
                "world_size": ctx.world_size, "backend": ctx.backend, "device": str(device),
                "same_batch": bool(torch.equal(idx, ref_idx)),
                "notes": trainer.notes, "loss": loss, "single_loss": ref_loss,
                "grad_norm": float(ref_grad.norm()), "grad_rel_diff": _rel(grad, ref_grad),
                "grad_max_abs_diff": float((grad - ref_grad).abs().max()),
                "grad_max_abs": float(ref_grad.abs().max()),
                "grad_allclose_1e-5": bool(torch.allclose(grad, ref_grad, rtol=1e-5,
                                                          atol=1e-5 * float(ref_grad.abs().max()))),
                "ranks_max_abs_diff": float((spread - low).abs().max()),
                "running_mean_rel_diff": _rel(running, ref_running),
            }
            if name in other:
                report[name]["single_vs_other_cudnn_rel_diff"] = _rel(other[name], ref_grad)
            if name in on_cpu:
                report[name].update(single_vs_cpu_rel_diff=_rel(ref_grad, on_cpu[name]),
                                    ddp_vs_cpu_rel_diff=_rel(grad, on_cpu[name]))
            if name in per_rank:
                pr_loss, pr_grad = per_rank[name]
                report[name].update(per_rank_loss=pr_loss, per_rank_grad_rel_diff=_rel(pr_grad, ref_grad),
                                    ddp_vs_per_rank_rel_diff=_rel(grad, pr_grad))
        if ctx.rank == 0:
            with open(out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    main(args.out, args.device)
