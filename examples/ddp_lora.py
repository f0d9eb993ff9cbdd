"""LoRA fine-tuning with DistributedDataParallel: every rank trains on its own data shard, DDP averages the
adapter gradients, rank 0 saves the adapter (PEFT's format) and every rank loads it back.

    torchrun --nproc_per_node=2 examples/ddp_lora.py                 # CPU: gloo
    torchrun --nproc_per_node=8 examples/ddp_lora.py --steps 200     # GPUs: NCCL, one GPU per process

The model is a small Llama (transformers), randomly initialised, so nothing is downloaded; the data is a
synthetic next-token task (each token is the previous one + 1) that the adapters learn in a few dozen steps.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastpeft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same base weights on every rank (DDP would broadcast rank 0's anyway)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2 + 8,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def batch(args, gen, device):
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
    ids = (start + torch.arange(args.seq)) % args.vocab  # next token = this token + 1
    return ids.to(device)


def setup():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))  # a failed rank ends the others' waits
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return torch.device("cpu")


def parser(doc=__doc__):
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", help="adapter directory (default: a temporary one)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fastpeft.inject_lora(tiny_llama(args, device), TARGETS, r=8, alpha=16)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of the data
    for step in range(args.steps):
        ids = batch(args, gen, device)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({world} ranks)", flush=True)

    out = args.out or os.path.join(tempfile.gettempdir(), f"fastpeft-ddp-lora-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    path = fastpeft.save_adapter(ddp, out)  # on every rank: rank 0 writes, the others wait for the files
    fresh = fastpeft.load_adapter(tiny_llama(args, device), path)  # on every rank: injects and loads
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    same = all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if "lora_" in n)
    if rank == 0:
        print(f"saved {path}; reloaded on every rank: {'identical' if same else 'DIFFERENT'}", flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes (gloo aborts otherwise)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
