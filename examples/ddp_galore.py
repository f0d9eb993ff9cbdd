"""Full-rank training with gradient-free GaLore under DistributedDataParallel: the weights of the linear layers never
get an [out, in] gradient; fastpeft averages their rank-r projected gradient R across the ranks (asynchronously,
in buckets, during the backward), DDP averages the rest (embeddings, norms, head). Two micro-batches per step:
the first under no_sync. Prints the bytes each rank all-reduces per step against what DDP would send for
the full gradients.

    torchrun --nproc_per_node=2 examples/ddp_galore.py               # CPU: gloo
    torchrun --nproc_per_node=8 examples/ddp_galore.py --steps 200   # GPUs: NCCL
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_lora import TARGETS, batch, parser, setup, tiny_llama  # noqa: E402

import fastpeft  # noqa: E402
import fastpeft.distributed as fd  # noqa: E402


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--rank", type=int, default=8, help="GaLore rank")
    p.add_argument("--gap", type=int, default=10, help="update_proj_gap")
    p.set_defaults(lr=3e-3)
    args = p.parse_args(argv)
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(args, device)
    fastpeft.galore.enable(model, TARGETS, rank=args.rank, update_proj_gap=args.gap, scale=0.25)  # before DDP
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    reducer = fd.galore_data_parallel(ddp)
    counted = [0]

    def count(state, bucket):  # DDP's own buckets: the non-GaLore gradients
        counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, count)
    opt = fastpeft.optim.GaLoreAdamW(ddp.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1 + rank)
    galore = [m for m in model.modules() if isinstance(m, fastpeft.galore.GaLoreLinear)]
    full_bytes = sum(m.weight.numel() * 4 for m in galore)  # what fp32 weight gradients would cost
    for step in range(args.steps):
        reducer.reset_stats()
        counted[0] = 0
        with fd.no_sync(ddp):  # micro-batch 1: R and .grad accumulate locally
            ids = batch(args, gen, device)
            (ddp(input_ids=ids, labels=ids).loss / 2).backward()
        ids = batch(args, gen, device)  # micro-batch 2: everything is averaged, overlapped with the backward
        loss = ddp(input_ids=ids, labels=ids).loss / 2
        loss.backward()
        opt.step()  # waits for the R all-reduce first
        opt.zero_grad(set_to_none=True)
        assert all(m.weight.grad is None for m in galore)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            s = reducer.stats()
            print(f"step {step:4d}  loss {2 * loss.item():.4f}  all-reduced: GaLore R {s['bytes_all_reduced'] / 1024:.1f} KiB "
                  f"(full weight gradients: {full_bytes / 1024:.1f} KiB), refresh {s['bytes_refresh'] / 1024:.1f} KiB, "
                  f"DDP {counted[0] / 1024:.1f} KiB", flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes (gloo aborts otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
