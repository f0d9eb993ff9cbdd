"""Data-parallel communication per training step: bytes all-reduced for full fine-tuning, LoRA and gradient-free
GaLore, counted and on paper.

    python -m fastpeft.bench comm                  # the Llama-7B table on paper, then the cpu preset counted
    python -m fastpeft.bench comm --paper          # the Llama-7B table only
    python -m fastpeft.bench comm --galore-rank 8 --variants full_ft fastpeft fastpeft_galore

Counted: a variant of the whole-model benchmark (fastpeft.bench.model_variants) is wrapped in
DistributedDataParallel over a 1-process process group (world size 1 still runs DDP's comm hooks and fastpeft's
GaLore reducer; gloo, or NCCL for CUDA) and takes `steps` training steps; a comm hook counts the bytes of every
DDP bucket, fastpeft.distributed.GaLoreReducer counts GaLore's R buckets and a refresh's sketch. Step 0 is a
GaLore refresh step (a randomized refresh reduces its sketch products once per update_proj_gap steps); the
last step is the steady state. On paper: the same sums from the parameter shapes (paper_bytes): a DDP
gradient has the parameter's dtype, GaLore's R is fp32, with max(m, n)·rank elements per matrix (proj_type "std"
compresses the shorter side); a randomized refresh step adds its sketch products, seed and basis
(paper_refresh_bytes). Compiled variants send what their eager twins send: counted on those.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from .model_variants import DTYPES, LAYERS, LORA_R, PRESETS, VARIANTS, batches, build, fresh_model, reference_state

MIB = 2.0 ** 20
LLAMA_7B = dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
COUNTED_METHOD = ("DDP over a 1-process group: a comm hook counts DDP's buckets, fastpeft's GaLoreReducer its R "
                  "buckets (and a refresh's sketch); bytes per rank and step")


# ------------------------------------------------------------------------------------------------- on paper


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of the seven linear kinds of one Llama decoder layer."""
    h, i = cfg["hidden"], cfg["intermediate"]
    kv = cfg["kv_heads"] * (h // cfg["heads"])
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def rest_numel(cfg: dict) -> int:
    """Parameters outside the seven linear kinds: embeddings, LM head (untied), the norms."""
    h = cfg["hidden"]
    return 2 * cfg["vocab"] * h + (2 * cfg["layers"] + 1) * h


def paper_bytes(cfg: dict, variant: str, *, lora_r: int = LORA_R, galore_rank: int | None = None,
                grad_bytes: int = 2) -> dict:
    """Bytes one rank all-reduces per steady-state step (DDP or fastpeft's reducer), from the shapes.

    variant: full_ft / galore_torch (every gradient, grad_bytes each), peft / fastpeft (LoRA r·(in + out) per
    linear, the rest frozen), fastpeft_galore (fp32 R of max(m, n)·rank elements per linear, the rest's
    gradients). Returns {"linears", "rest", "total"} in bytes."""
    base = variant.removesuffix("_compiled")
    shapes = linear_shapes(cfg).values()
    layers = cfg["layers"]
    if base in ("full_ft", "galore_torch"):
        linears, rest = layers * sum(m * n for m, n in shapes) * grad_bytes, rest_numel(cfg) * grad_bytes
    elif base in ("peft", "fastpeft"):
        linears, rest = layers * sum(lora_r * (m + n) for m, n in shapes) * grad_bytes, 0
    elif base == "fastpeft_galore":
        rank = cfg.get("galore_rank") if galore_rank is None else galore_rank
        linears = layers * sum(max(m, n) * min(rank, m, n) for m, n in shapes) * 4
        rest = rest_numel(cfg) * grad_bytes
    else:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    return {"linears": linears, "rest": rest, "total": linears + rest}


def paper_refresh_bytes(cfg: dict, rank: int | None = None, *, oversample: int = 8, power_iters: int = 2,
                        basis_bytes: int = 2) -> int:
    """Extra bytes of a randomized GaLore refresh step (1 in update_proj_gap), from the shapes: per matrix, the
    range finder's (power_iters + 1)·(m + n)·k fp32 sketch products (k = min(rank + oversample, m, n)), the seed
    (8 bytes) and the basis broadcast (min(m, n)·rank numbers in the weight's dtype)."""
    rank = cfg.get("galore_rank") if rank is None else rank
    per_layer = 0
    for m, n in linear_shapes(cfg).values():
        k = min(rank + oversample, m, n)
        per_layer += (power_iters + 1) * (m + n) * k * 4 + 8 + min(m, n) * rank * basis_bytes
    return cfg["layers"] * per_layer


def llama7b_table(galore_ranks=(128, 512), lora_r: int = 16, grad_bytes: int = 2) -> list[dict]:
    """The paper table for Llama-7B shapes (hidden 4096, intermediate 11008, 32 layers, vocab 32000): bytes
    all-reduced per step and rank, bf16 gradients, fp32 GaLore R."""
    rows = [("full fine-tuning", "full_ft", {}), (f"LoRA r={lora_r} (7 linear kinds)", "fastpeft", {})]
    rows += [(f"GaLore grad-free rank {r}", "fastpeft_galore", {"galore_rank": r}) for r in galore_ranks]
    full = paper_bytes(LLAMA_7B, "full_ft", grad_bytes=grad_bytes)
    out = []
    for label, variant, kw in rows:
        b = paper_bytes(LLAMA_7B, variant, lora_r=lora_r, grad_bytes=grad_bytes, **kw)
        refresh = paper_refresh_bytes(LLAMA_7B, kw["galore_rank"], basis_bytes=grad_bytes) if kw else 0
        out.append(dict(label=label, variant=variant, **b, linears_vs_full=full["linears"] / b["linears"],
                        refresh_extra=refresh))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"  {'':<32} {'linear layers':>14} {'embeddings, norms, head':>24} {'total':>11} {'linears: x less':>16}"
             f" {'+ refresh step (1 in gap)':>26}"]
    for r in rows:
        extra = human_bytes(r["refresh_extra"]) if r.get("refresh_extra") else "-"
        lines.append(f"  {r['label']:<32} {human_bytes(r['linears']):>14} {human_bytes(r['rest']):>24} "
                     f"{human_bytes(r['total']):>11} {r['linears_vs_full']:>15.1f}x {extra:>26}")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------------- counted


@contextlib.contextmanager
def one_process_group(device):
    """A 1-process group (an in-process store, no port) unless one is initialized; yields it (None when the
    initialized one has more than one rank: nothing is counted then)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD if dist.get_worldhuman_bytes() == 1 else None
        return
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def count_variant(name: str, cfg: dict, state: dict, data: list, opts: dict, device, dtype, builder=build,
                  steps: int = 2) -> dict:
    """Bytes all-reduced per step by variant `name` (its eager twin for a compiled one): DDP's buckets and
    GaLore's R, counted over `steps` steps (step 0 refreshes GaLore's projector)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastpeft.distributed as fd

    eager = name.removesuffix("_compiled")
    with one_process_group(device) as group:
        if group is None:
            return {"status": "skipped", "reason": "torch.distributed runs several ranks here; counted in a 1-process group only"}
        b = builder(eager, fresh_model(cfg, state, device, dtype), dict(opts, compile_backend=None))
        ddp = DDP(b.model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None)
        counted = [0]

        def hook(_, bucket):  # DDP's default all-reduce, counted
            buf = bucket.buffer()
            counted[0] += buf.numel() * buf.element_size()
            return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
        reducer = fd.galore_data_parallel(ddp) if fd.galore_layers(b.model) else None
        per_step = []
        for ids in data[:steps]:
            counted[0] = 0
            if reducer is not None:
                reducer.reset_stats()
            loss = ddp(input_ids=ids, labels=ids).loss
            loss.backward()
            b.optimizer.step()
            b.optimizer.zero_grad(set_to_none=True)
            s = reducer.stats() if reducer is not None else {"bytes_all_reduced": 0, "bytes_refresh": 0}
            per_step.append({"ddp": counted[0], "galore_r": s["bytes_all_reduced"], "galore_refresh": s["bytes_refresh"],
                             "total": counted[0] + s["bytes_all_reduced"] + s["bytes_refresh"]})
        if reducer is not None:
            reducer.detach()
        del ddp, b
    last = per_step[-1]
    return {"status": "ok", "bytes_per_step": last["total"], "ddp_bytes": last["ddp"], "galore_r_bytes": last["galore_r"],
            "first_step_bytes": per_step[0]["total"], "steps": per_step, "counted_on": eager, "method": COUNTED_METHOD}


def run(cfg: dict, variants, device, *, seed: int = 0, builder=build) -> list[dict]:
    """Counted and paper bytes per step for each variant on the benchmark's model `cfg`."""
    dtype = DTYPES[cfg["dtype"]]
    state = reference_state(cfg, seed)
    data = batches(cfg, 2, seed, device)
    opts = dict(seed=seed, galore_rank=cfg["galore_rank"], compile_backend=None)
    grad_bytes = torch.empty((), dtype=dtype).element_size()
    out = []
    for name in variants:
        try:
            rec = count_variant(name, cfg, state, data, opts, device, dtype, builder)
        except Exception as exc:  # recorded; the other variants still run
            rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        rec["impl"] = name
        rec["paper"] = paper_bytes(cfg, name, grad_bytes=grad_bytes)
        out.append(rec)
    return out


def format_counted(results: list[dict]) -> str:
    lines = [f"  {'variant':<20} {'counted / step':>15} {'on paper':>12} {'DDP buckets':>12} {'GaLore R':>10} "
             f"{'refresh step':>13}"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"  {r['impl']:<20} {r.get('status', '?').upper()} {r.get('error') or r.get('reason', '')}")
            continue
        lines.append(f"  {r['impl']:<20} {human_bytes(r['bytes_per_step']):>15} {human_bytes(r['paper']['total']):>12} "
                     f"{human_bytes(r['ddp_bytes']):>12} {human_bytes(r['galore_r_bytes']):>10} {human_bytes(r['first_step_bytes']):>13}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench comm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="only the Llama-7B table on paper")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the model counted (default cpu)")
    p.add_argument("--device", help="cuda or cpu (default: cpu for the cpu preset, else cuda when available)")
    p.add_argument("--galore-rank", type=int, help="override the preset's GaLore rank")
    p.add_argument("--galore-ranks", type=int, nargs="+", default=[128, 512], help="the paper table's GaLore ranks")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["full_ft", "fastpeft", "fastpeft_galore"])
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    print("Bytes all-reduced per data-parallel step and rank, Llama-7B shapes (hidden 4096, intermediate 11008, "
          "32 layers, vocab 32000), on paper: bf16 gradients, fp32 GaLore R; LoRA and GaLore on q,k,v,o,gate,up,down")
    print(format_table(llama7b_table(tuple(args.galore_ranks))))
    if args.paper:
        return 0
    cfg = dict(PRESETS[args.preset])
    if args.galore_rank is not None:
        cfg["galore_rank"] = args.galore_rank
    device = torch.device(args.device or ("cuda" if args.preset != "cpu" and torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    print(f"\nCounted on the {args.preset} preset's model (L{cfg['layers']} h{cfg['hidden']} i{cfg['intermediate']} "
          f"vocab {cfg['vocab']}, {cfg['dtype']}, LoRA r={LORA_R}, GaLore rank {cfg['galore_rank']}, {device.type}): "
          f"{COUNTED_METHOD}")
    results = run(cfg, args.variants, device)
    print(format_counted(results))
    return 1 if any(r.get("status") == "error" for r in results) else 0


__all__ = ["LLAMA_7B", "human_bytes", "linear_shapes", "paper_bytes", "llama7b_table", "format_table", "one_process_group",
           "paper_refresh_bytes", "count_variant", "run", "format_counted", "main", "LAYERS"]
