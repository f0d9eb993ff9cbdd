"""python -m fastpeft.bench model: a whole Llama-architecture fine-tuning step, each training variant of
fastpeft.bench.model_variants against full fine-tuning and HF PEFT: tokens/s, peak memory, saved activations,
a per-op time breakdown and the loss of every step; writes <out>/<date>_<device>_model.json and a PNG.

    python -m fastpeft.bench model --preset cpu            # tiny model, fp32, about a minute on 2 cores
    python -m fastpeft.bench model --preset gpu            # 2 layers at Llama-3-8B widths, seq 2048 x batch 4, bf16
    python -m fastpeft.bench model --layers 4 --hidden 256 --variants full_ft peft fastpeft

Communication: each variant's bytes all-reduced per data-parallel step and rank, counted under DDP in a
1-process group (fastpeft.bench.comm: DDP's buckets, GaLore's R), printed next to time and memory and
recorded as "comm" (with the figure on paper); --no-comm leaves it out.

Checks first: every variant must start from the same base weights and give the reference's first-step loss
(full_ft's, else the first variant's) within tolerances.py's bound for the dtype; a variant that fails is
recorded as failed and not timed. Exit status 1 when a variant fails or raises.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import schema, tolerances
from .memory import SavedTensors
from .model_variants import DESCRIPTIONS, DTYPES, PRESETS, VARIANTS, base_fingerprint, batches, build, \
    fresh_model, reference_state

MIB = 2.0 ** 20
TOP_OPS = 8
CPU_PEAK_METHOD = ("resident bytes at the step's start (parameters, gradients, optimizer state; storages once) + "
                   "the peak of CPU storages allocated during one step and still alive (TorchDispatchMode)")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the CPU storages that ops create while active and that are still alive (a storage is
    counted once, when first seen, and released when its Python storage object is finalized)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self._seen:
                    self._seen[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key)
        return out


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen = {}
    tensors = [*model.parameters(), *model.buffers()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in (s.values() if isinstance(s, dict) else ())
                if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def loss_tolerance(cfg: dict, dtype: torch.dtype, device) -> float:
    """Relative tolerance of a first-step loss: tolerances.py's bound at the longest accumulation (the MLP's
    intermediate width) once per decoder layer, as each layer's rounding errors carry into the next."""
    k = max(cfg["hidden"], cfg["intermediate"])
    return tolerances.bound(tolerances.row(dtype, device), k) * cfg["layers"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(b, ids) -> torch.Tensor:
    loss = b.call(ids)
    loss.backward()
    b.optimizer.step()
    b.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _top_ops(prof, device) -> list[dict]:
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    evs = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in evs) or 1
    return [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "fraction": getattr(e, attr) / total, "calls": e.count}
            for e in evs[:TOP_OPS]]


def run_variant(name: str, cfg: dict, state: dict, data: list, ref: dict, opts: dict, device, dtype,
                builder=build) -> dict:
    """Build, check (same base weights, first-step loss), time, measure and profile one variant."""
    rec = {"impl": name, "status": "ok", "main_metric": "step", "compile_backend": None, "losses": []}
    b = builder(name, fresh_model(cfg, state, device, dtype), opts)
    rec["compile_backend"] = b.compiled
    fp = base_fingerprint(b.model)
    losses = []
    t0 = time.perf_counter()
    losses.append(_train_step(b, data[0]))
    rec["first_step_s"] = round(time.perf_counter() - t0, 3)  # includes compilation
    first = float(losses[0])
    rec["first_loss"] = first
    if ref.get("fingerprint") is None:
        ref.update(fingerprint=fp, loss=first, impl=name)
    same_weights = fp.shape == ref["fingerprint"].shape and bool(torch.equal(fp, ref["fingerprint"]))
    rel = abs(first - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    rec["check"] = {"reference": ref["impl"], "same_base_weights": same_weights, "first_loss_rel_diff": rel,
                    "tolerance": opts["loss_tol"], "passed": same_weights and rel <= opts["loss_tol"]}
    if not rec["check"]["passed"]:
        rec["status"] = "fail"
        rec["losses"] = [first]
        return rec
    nw, ns = opts["warmup"], opts["steps"]
    for ids in data[1:1 + nw]:
        losses.append(_train_step(b, ids))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for ids in data[1 + nw:1 + nw + ns]:
        losses.append(_train_step(b, ids))
    _sync(device)
    dt = time.perf_counter() - t0
    rec["times_ms"] = {"step": 1e3 * dt / ns}
    rec["tokens_per_s"] = ns * cfg["batch"] * cfg["seq"] / dt
    ids = data[1 + nw + ns]
    if device.type == "cuda":
        rec["peak_bytes"], rec["peak_method"] = int(torch.cuda.max_memory_allocated(device)), \
            "torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state, activations)"
        saved = SavedTensors(b.model.parameters())
        with saved:
            loss = b.call(ids)
    else:
        base, live, saved = resident_bytes(b.model, b.optimizer), LiveBytes(), SavedTensors(b.model.parameters())
        with live, saved:
            loss = b.call(ids)
            loss.backward()
            b.optimizer.step()
            b.optimizer.zero_grad(set_to_none=True)
        rec["peak_bytes"], rec["peak_method"] = base + live.peak, CPU_PEAK_METHOD
    if device.type == "cuda":
        loss.backward()
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)
    losses.append(loss.detach())
    rec["saved_total_bytes"] = saved.total_bytes
    rec["saved_beyond_inputs_bytes"] = saved.beyond_inputs_bytes
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        losses.append(_train_step(b, data[2 + nw + ns]))
        _sync(device)
    rec["top_ops"] = _top_ops(prof, device)
    rec["losses"] = [float(v) for v in losses]
    return rec


def compare(results: list[dict]) -> dict:
    """The issue's target ratios, from the records that ran (None where a side is missing)."""
    r = {x["impl"]: x for x in results if x.get("status") == "ok"}

    def q(a, b, key):
        va, vb = (r.get(a) or {}).get(key), (r.get(b) or {}).get(key)
        return va / vb if va is not None and vb else None

    step = lambda a, b: q(a, b, "tokens_per_s") and 1 / q(a, b, "tokens_per_s")  # noqa: E731
    return {"fastpeft_tokens_vs_peft": q("fastpeft", "peft", "tokens_per_s"),
            "fastpeft_tokens_vs_peft_compiled": q("fastpeft", "peft_compiled", "tokens_per_s"),
            "fastpeft_compiled_tokens_vs_peft_compiled": q("fastpeft_compiled", "peft_compiled", "tokens_per_s"),
            "fastpeft_peak_vs_peft": q("fastpeft", "peft", "peak_bytes"),
            "fastpeft_step_vs_full_ft": step("fastpeft", "full_ft"),
            "peft_step_vs_full_ft": step("peft", "full_ft"),
            "fastpeft_galore_peak_vs_galore_torch": q("fastpeft_galore", "galore_torch", "peak_bytes"),
            "fastpeft_galore_step_vs_galore_torch": step("fastpeft_galore", "galore_torch"),
            "targets": "GPU preset: fastpeft >= 1.2x peft tokens/s and >= peft_compiled's; peak <= peft's; "
                       "fastpeft step <= 0.72x full_ft's; fastpeft_galore peak <= 0.6x galore_torch's at equal "
                       "or better step time. CPU preset: fastpeft not slower than peft."}


def plot(doc: dict, path: str) -> str | None:
    """tokens/s, peak memory and saved activations per variant, and the loss curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    from .report import device_banner

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, title, scale) in zip(axes.flat, [("tokens_per_s", "tokens/s", 1), ("peak_bytes", "peak MiB", MIB),
                                                   ("saved_beyond_inputs_bytes", "saved activations MiB", MIB)]):
        vals = [(r.get(key) or 0) / scale for r in ok]
        ax.bar(range(len(ok)), vals, color=[f"C{i}" for i in range(len(ok))])
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([r["impl"] for r in ok], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    ax = axes.flat[3]
    for i, r in enumerate(doc["results"]):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", ms=3, color=f"C{i}", label=r["impl"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.suptitle(f"whole model ({doc['settings']['label']}): {device_banner(doc['meta'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="cpu (default without CUDA) or gpu")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    for flag in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab", "seq", "batch", "steps",
                 "warmup", "galore-rank"):
        p.add_argument(f"--{flag}", type=int, help="override the preset's value")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the preset's (bf16 on gpu, fp32 on cpu)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--compile-backend", help="torch.compile backend (default: inductor on gpu, aot_eager on cpu, "
                                             "where inductor's compile time would dominate the run)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--no-comm", action="store_true", help="do not count the bytes all-reduced per data-parallel step")
    return p


def label_of(cfg: dict) -> str:
    return "L{layers}_h{hidden}_i{intermediate}_s{seq}x{batch}_{dtype}".format(**cfg)


def run(cfg: dict, variants, device, *, seed: int = 0, builder=build, on_variant=None, comm: bool = False) -> list[dict]:
    """Every variant on the same weights and batches; records in the harness's result format. on_variant(results)
    after each variant (the CLI rewrites its JSON then, so a run cut short by a timeout keeps what it measured).
    comm: also count each variant's bytes all-reduced per data-parallel step (rec["comm"], fastpeft.bench.comm)."""
    dtype = DTYPES[cfg["dtype"]]
    state = reference_state(cfg, seed)
    data = batches(cfg, cfg["warmup"] + cfg["steps"] + 3, seed, device)
    opts = dict(seed=seed, galore_rank=cfg["galore_rank"], compile_backend=cfg["compile_backend"],
                warmup=cfg["warmup"], steps=cfg["steps"], loss_tol=loss_tolerance(cfg, dtype, device))
    case = {"label": label_of(cfg), "tags": ["model"], **cfg}
    ref, results = {}, []
    order = sorted(variants, key=lambda v: v != "full_ft")  # full_ft, when run, is the reference
    for name in order:
        t0 = time.monotonic()
        try:
            rec = run_variant(name, cfg, state, data, ref, opts, device, dtype, builder)
        except Exception as exc:  # recorded and reported; the other variants still run
            rec = {"impl": name, "status": "error", "error": f"{type(exc).__name__}: {exc}", "losses": []}
        if comm and rec["status"] == "ok":
            rec["comm"] = _count_comm(name, cfg, state, data, opts, device, dtype, builder)
        rec["case"], rec["wall_s"] = case, round(time.monotonic() - t0, 1)
        results.append(rec)
        print(_line(rec), flush=True)
        if on_variant is not None:
            on_variant(results)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # each compiled variant compiles afresh, not against the previous one's cache
    return results


def _count_comm(name, cfg, state, data, opts, device, dtype, builder) -> dict:
    from . import comm

    try:
        rec = comm.count_variant(name, cfg, state, data, opts, device, dtype, builder)
    except Exception as exc:  # the timed record stands; the count says why it is missing
        rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    try:
        rec["paper_bytes_per_step"] = comm.paper_bytes(cfg, name, galore_rank=opts["galore_rank"],
                                                       grad_bytes=torch.empty((), dtype=dtype).element_size())["total"]
    except ValueError:  # a variant the paper formulas do not know (a test's builder)
        rec["paper_bytes_per_step"] = None
    return rec


def _comm_text(r: dict) -> str:
    c = r.get("comm")
    if c is None:
        return ""
    if c.get("status") != "ok":
        return f"  comm {c.get('status')}"
    from .comm import human_bytes

    return f"  comm {human_bytes(c['bytes_per_step'])}/step"


def _line(r: dict) -> str:
    if r["status"] == "error":
        return f"  {r['impl']:<18} ERROR {r['error']}"
    c = r["check"]
    head = f"  {r['impl']:<18} first loss {r['first_loss']:.6f} (rel diff {c['first_loss_rel_diff']:.1e}, " \
           f"same weights {c['same_base_weights']})"
    if r["status"] != "ok":
        return head + "  FAILED the check, not timed"
    return (head + f"  {r['tokens_per_s']:.0f} tok/s  step {r['times_ms']['step']:.1f} ms  peak "
            f"{r['peak_bytes'] / MIB:.1f} MiB  saved {r['saved_beyond_inputs_bytes'] / MIB:.1f} MiB{_comm_text(r)}  "
            f"[{r['wall_s']} s]")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = dict(PRESETS[preset])
    for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "steps", "warmup",
              "galore_rank", "dtype", "compile_backend", "threads"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    if cfg["steps"] < 1 or cfg["warmup"] < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    variants = [v for v in args.variants if not (args.no_compile and v.endswith("_compiled"))]
    if device.type == "cpu" and cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    meta = schema.environment(device)
    from .report import device_banner

    print(device_banner(meta), flush=True)
    t0 = time.monotonic()
    label = label_of(cfg)
    path = os.path.join(args.out, schema.file_stem(meta, "model", args.tag) + ".json")
    settings = dict(preset=preset, label=label, model=cfg, variants=variants, seed=args.seed,
                    descriptions={v: DESCRIPTIONS[v] for v in variants},
                    lora=dict(r=16, alpha=32, dropout=0.0, targets="q,k,v,o,gate,up,down"),
                    loss_tolerance=loss_tolerance(cfg, DTYPES[cfg["dtype"]], device),
                    method="tokens/s: wall clock over the timed steps after the first step and the warm-up, "
                           "synchronised; saved activations: saved_tensors_hooks over one forward, storages once, "
                           "parameters excluded; top_ops: torch.profiler self time of one further step; comm: "
                           "bytes all-reduced per data-parallel step and rank, DDP in a 1-process group "
                           "(fastpeft.bench.comm), after the timed steps")

    def doc_of(results):
        doc = schema.document("model", "full_ft", meta, dict(settings, elapsed_s=round(time.monotonic() - t0, 1)),
                              None, results)
        doc["comparisons"] = compare(results)
        return doc

    def on_variant(results):
        if not args.no_json:
            schema.write_json(doc_of(results), path)

    results = run(cfg, variants, device, seed=args.seed, on_variant=on_variant, comm=not args.no_comm)
    doc = doc_of(results)
    for k, v in doc["comparisons"].items():
        if k != "targets":
            print(f"  {k}: {'-' if v is None else f'{v:.3f}'}")
    if not args.no_json:
        print("wrote", schema.write_json(doc, path))
        if not args.no_plot:
            png = plot(doc, path[:-5] + ".png")
            print("wrote", png) if png else print("no plot: matplotlib is not installed")
    return 1 if any(r["status"] != "ok" for r in results) else 0


__all__ = ["LiveBytes", "run", "run_variant", "compare", "plot", "main", "loss_tolerance"]
