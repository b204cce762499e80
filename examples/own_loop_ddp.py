"""datkit's parts in your own plain DDP training loop: PGD adversarial training with LALR and int8 gradients.

    torchrun --standalone --nproc_per_node 2 examples/own_loop_ddp.py --steps 100

No datkit config, trainer or backend: a plain ``torch.distributed`` loop that borrows three pieces --
``datkit.attacks.PGD`` (adversarial examples, on the unwrapped model), ``datkit.optim.LALR`` (DAT's layer-wise
adaptive learning rate) and ``datkit.compress.register_ddp_hook`` (DDP's gradient allreduce replaced by the
DAT paper's "8-bit 2-sided" exchange, with datkit's byte accounting). CPU + gloo, or one GPU per process + NCCL.
At the end rank 0 prints one JSON line: the final loss and the bytes per iteration this worker sent, next to
what DDP's float32 allreduce would send.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from datkit.attacks import PGD
from datkit.compress import allreduce_bytes, register_ddp_hook
from datkit.optim import LALR


def make_model() -> nn.Sequential:
    """A small CNN for 1 x 8 x 8 images in [0, 1], 10 classes (no BatchNorm: nothing to sync but gradients)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data() -> TensorDataset:
    """scikit-learn's digits as (N, 1, 8, 8) float images in [0, 1] (pixel values 0..16 / 16) and int labels."""
    from sklearn.datasets import load_digits  # 1,797 8x8 digits shipped with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(x, torch.tensor(digits.target, dtype=torch.long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--save-weights", default="", help="each rank saves its final weights to PREFIX.rank<r>.pt")
    args = parser.parse_args()

    # 1. The process group, from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    #    NCCL with one GPU per process when there are enough GPUs, else gloo on the CPU.
    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)

    # 2. Model, DDP, and datkit's compressed gradient exchange in place of DDP's float32 allreduce.
    model = make_model().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    hook = register_ddp_hook(ddp, "int8", two_sided=True)  # before the first backward

    # 3. LALR (DAT, Algorithm 1): each weight tensor moves by min(||w||, 10) * lr per step, over Adam's direction.
    optimizer = LALR(ddp.parameters(), lr=0.02, base="adam")

    # 4. PGD-5, l_inf eps = 0.1 with a random start; each rank draws its own start.
    attack = PGD(eps=0.1, alpha=0.03, steps=5, random_start=True,
                 generator=torch.Generator(device=device).manual_seed(1000 + rank))

    # 5. Data: DistributedSampler gives each rank its part of one shuffled permutation per epoch.
    data = make_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    step, epoch, loss = 0, 0, torch.zeros((), device=device)
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            # Attack the plain module, not the DDP wrapper: no gradient sync, no buffer broadcast.
            x_adv = attack(ddp.module, x, y)
            loss = F.cross_entropy(ddp(x_adv), y)  # PGD-AT (Madry et al.): train on the adversarial batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the hook averages the int8-coded gradients over the ranks here
            optimizer.step()
            step += 1
            if step == args.steps:
                break
        epoch += 1

    # 6. Report: the last step's loss averaged over ranks; bytes per iteration by the hook vs float32 allreduce.
    final = loss.detach().clone()
    dist.all_reduce(final)
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per_iter = hook.bytes_sent() / step  # this worker's, every iteration alike (datkit's accounting)
    hook.close()  # after the last backward: stops the hook's background thread
    if args.save_weights:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, f"{args.save_weights}.rank{rank}.pt")
    if rank == 0:
        fp32 = allreduce_bytes(4 * n_params, world)  # a ring allreduce of the float32 gradients
        print(json.dumps({"world_size": world, "steps": step, "params": n_params, "final_loss": final.item() / world,
                          "bytes_per_iter": bytes_per_iter, "fp32_allreduce_bytes_per_iter": fp32,
                          "ratio": bytes_per_iter / fp32 if fp32 else math.nan, "comm_seconds": hook.comm_seconds()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
