"""LoRA fine-tuning with FSDP2 (torch.distributed.fsdp.fully_shard): every decoder layer, then the root, is
sharded across the ranks (the frozen base weights and the adapters alike); the adapter is gathered for saving
(the file is the ordinary, unsharded PEFT format) and loaded back into a sharded model on every rank.

    torchrun --nproc_per_node=2 examples/fsdp2_lora.py               # CPU: gloo
    torchrun --nproc_per_node=8 examples/fsdp2_lora.py --steps 200   # GPUs: NCCL
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_lora import TARGETS, batch, parser, setup, tiny_llama  # noqa: E402

import fastpeft  # noqa: E402


def sharded_lora_llama(args, device):
    model = fastpeft.inject_lora(tiny_llama(args, device), TARGETS, r=8, alpha=16)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = sharded_lora_llama(args, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(args.steps):
        ids = batch(args, gen, device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({world} ranks, sharded)", flush=True)

    out = args.out or os.path.join(tempfile.gettempdir(), f"fastpeft-fsdp2-lora-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    path = fastpeft.save_adapter(model, out)  # collective: adapters all-gathered, rank 0 writes, all wait
    fresh = sharded_lora_llama(args, device)
    fastpeft.load_adapter(fresh, path)  # every rank takes its shard of the file's tensors
    trained = {n: p.full_tensor() for n, p in model.named_parameters() if "lora_" in n}
    same = all(torch.equal(p.full_tensor(), trained[n]) for n, p in fresh.named_parameters() if "lora_" in n)
    if rank == 0:
        print(f"saved {path}; reloaded into a sharded model on every rank: {'identical' if same else 'DIFFERENT'}",
              flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes (gloo aborts otherwise)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
