"""GaLore benchmarks (issue 5): per layer, on CUDA at [4096, 4096] and [4096, 11008], ranks 128 and 512,
M = 8192 tokens, bf16 weights, fp32 optimizer state.

  step      optimizer step time (non-refresh step): fastpeft GaLoreAdamW (Triton) vs galore-torch's GaLoreAdamW
  backward  the layer's backward: gradient-free (dX + R from X and dY) vs the standard one (dX + the full dW)
            target: gradient-free <= 0.8x standard at rank 128
  memory    peak memory of one training step (fwd + bwd + step) above the model, both modes; the saved
            bytes are the [out, in] gradient (and galore-torch's update temporaries)
  refresh   projector refresh: randomized range finder through X and dY vs torch.linalg.svd of G (fp32)
            target: >= 10x faster at [4096, 11008], rank 128
  e2e       a small randomly initialised transformers Llama, loss over --steps steps: AdamW vs gradient-free
            GaLore (the paper reports GaLore within a few percent of full-rank AdamW's loss)

    python benchmarks/bench_galore.py [--only step backward memory refresh e2e] [--out benchmarks/results/galore.json]

On a CPU-only machine every case runs at a small size (the torch backend, fp32): a smoke run whose times
mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

import fastpeft.galore as fg  # noqa: E402
from fastpeft.ops.galore_linear import galore_linear  # noqa: E402
from fastpeft.optim import GaLoreAdamW  # noqa: E402
from fastpeft.optim import projector as pj  # noqa: E402

CUDA = torch.cuda.is_available()


def timer(fn, reps=3):
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=50) * 1e-3
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def load_galore_torch():
    """galore-torch's AdamW without its package __init__ (which imports bitsandbytes), or None."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("_galore_torch_bench")
    pkg.__path__ = [root]
    sys.modules["_galore_torch_bench"] = pkg
    for name in ("galore_projector", "adamw"):
        s = importlib.util.spec_from_file_location(f"_galore_torch_bench.{name}", os.path.join(root, f"{name}.py"))
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
    return sys.modules["_galore_torch_bench.adamw"].AdamW


def bench_step(out_f, in_f, rank, dtype, device):
    """Non-refresh optimizer step: the first step (the refresh) is taken outside the timing."""
    res = {}
    g = torch.randn(out_f, in_f, device=device, dtype=dtype)
    group = {"rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    impls = [("fastpeft", lambda ps: GaLoreAdamW([{"params": ps, **group}], lr=1e-5))]
    gt = load_galore_torch()
    if gt is not None:
        impls.append(("galore_torch", lambda ps: gt([{"params": ps, **group}], lr=1e-5, no_deprecation_warning=True)))
    else:
        res["galore_torch"] = "not installed"
    for name, make in impls:
        w = torch.nn.Parameter(torch.randn(out_f, in_f, device=device, dtype=dtype))
        w.grad = g
        opt = make([w])
        opt.step()
        res[name] = {"step_s": timer(opt.step)}
    return res


def bench_backward(M, out_f, in_f, rank, dtype, device):
    x = torch.randn(M, in_f, device=device, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(out_f, in_f, device=device, dtype=dtype) * in_f ** -0.5)
    dy = torch.randn(M, out_f, device=device, dtype=dtype)
    st = fg.GaLoreLinearState(w.shape, rank, 10**9, 0.25, "std", "randomized", "keep", 8, 2, None)
    st.P, st.Q = pj.randomized_basis_dense(torch.randn(out_f, in_f, device=device), rank, st.side, dtype=dtype)
    st.refresh_due = False
    y_std = F.linear(x, w)
    y_gf = galore_linear(x, w, None, st)
    std = timer(lambda: torch.autograd.grad(y_std, [x, w], dy, retain_graph=True))
    gf = timer(lambda: torch.autograd.grad(y_gf, [x], dy, retain_graph=True))
    return {"standard_s": std, "gradient_free_s": gf, "ratio": gf / std, "target_ratio": 0.8}


def bench_memory(M, out_f, in_f, rank, dtype, device):
    if not CUDA:
        return "CUDA only (torch.cuda.max_memory_allocated)"
    res = {}
    for mode in ("standard_galore", "gradient_free"):
        torch.cuda.empty_cache()
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        x = torch.randn(M, in_f, device=device, dtype=dtype, requires_grad=True)
        if mode == "gradient_free":
            model = torch.nn.Sequential(lin)
            fg.enable(model, ["0"], rank=rank, update_proj_gap=10**9, scale=0.25)
            opt = GaLoreAdamW(model.parameters(), lr=1e-5)
        else:
            model = torch.nn.Sequential(lin)
            opt = GaLoreAdamW([{"params": [lin.weight], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25}], lr=1e-5)
        for _ in range(2):  # the first step holds the refresh; measure the second
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        res[mode] = {"peak_above_start_bytes": torch.cuda.max_memory_allocated() - base}
        del model, opt, lin, x
    res["saved_bytes"] = res["standard_galore"]["peak_above_start_bytes"] - res["gradient_free"]["peak_above_start_bytes"]
    res["weight_grad_bytes"] = out_f * in_f * torch.tensor([], dtype=dtype).element_size()
    return res


def bench_refresh(M, out_f, in_f, rank, dtype, device):
    x = torch.randn(M, in_f, device=device, dtype=dtype)
    dy = torch.randn(M, out_f, device=device, dtype=dtype)
    side = pj.projection_side((out_f, in_f), "std")
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = timer(lambda: pj.randomized_basis_factored(x, dy, rank, side, generator=gen), reps=1)
    g = (dy.t() @ x).float()
    svd = timer(lambda: torch.linalg.svd(g, full_matrices=False), reps=1)
    rb = pj.randomized_basis_factored(x, dy, rank, side, generator=gen)
    sb = pj.svd_basis(g, rank, side)
    cap = lambda b: pj.project(g, *(None if t is None else t.float() for t in b)).norm().item() ** 2  # noqa: E731
    return {"randomized_s": rnd, "svd_s": svd, "speedup": svd / rnd, "target_speedup": 10,
            "captured_energy_vs_svd": cap(rb) / cap(sb)}


def bench_e2e(steps, device, small):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # optional dependency
        return f"transformers unavailable: {exc}"
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=128) if small else \
        dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512)
    seq, batch = (32, 8) if small else (256, 16)
    gen = torch.Generator().manual_seed(0)
    # a learnable synthetic language: tokens follow a fixed random bigram table
    table = torch.randint(0, cfg["vocab_size"], (cfg["vocab_size"], 4), generator=gen)

    def batch_fn():
        toks = torch.empty(batch, seq, dtype=torch.long)
        toks[:, 0] = torch.randint(0, cfg["vocab_size"], (batch,), generator=gen)
        for t in range(1, seq):
            toks[:, t] = table[toks[:, t - 1], torch.randint(0, 4, (batch,), generator=gen)]
        return toks.to(device)

    data = [batch_fn() for _ in range(steps)]
    out = {}
    for mode in ("adamw", "galore_gradient_free"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(device)
        if mode == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        else:
            rank = 16 if small else 128
            fg.enable(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=rank,
                      update_proj_gap=50, scale=0.25)
            # the paper's recipe: GaLore's scale 0.25 comes with a larger learning rate than AdamW's
            opt = GaLoreAdamW(model.parameters(), lr=4e-3)
        losses = []
        for toks in data:
            loss = model(input_ids=toks, labels=toks).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out[mode] = {"first_loss": losses[0], "final_loss_avg10": sum(losses[-10:]) / len(losses[-10:])}
    out["final_ratio"] = out["galore_gradient_free"]["final_loss_avg10"] / out["adamw"]["final_loss_avg10"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=["step", "backward", "memory", "refresh", "e2e"])
    ap.add_argument("--steps", type=int, default=None, help="e2e steps (200 on CUDA, 20 on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if CUDA:
        device, dtype, M = "cuda", torch.bfloat16, 8192
        grid = list(itertools.product(((4096, 4096), (4096, 11008)), (128, 512)))
    else:
        device, dtype, M = "cpu", torch.float32, 96
        grid = [((48, 80), 8)]
    rows = []
    for (out_f, in_f), rank in grid:
        row = {"out": out_f, "in": in_f, "rank": rank, "M": M, "dtype": str(dtype)}
        if "step" in args.only:
            row["step"] = bench_step(out_f, in_f, rank, dtype, device)
        if "backward" in args.only:
            row["backward"] = bench_backward(M, out_f, in_f, rank, dtype, device)
        if "memory" in args.only:
            row["memory"] = bench_memory(M, out_f, in_f, rank, dtype, device)
        if "refresh" in args.only:
            row["refresh"] = bench_refresh(M, out_f, in_f, rank, dtype, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    doc = {"device": torch.cuda.get_device_name() if CUDA else "cpu (smoke run; times mean nothing)",
           "torch": torch.__version__, "cases": rows}
    if "e2e" in args.only:
        doc["e2e"] = bench_e2e(args.steps or (200 if CUDA else 20), device, small=not CUDA)
        print(json.dumps({"e2e": doc["e2e"]}), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
