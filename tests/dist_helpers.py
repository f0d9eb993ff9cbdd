"""Helpers of tests/test_distributed*.py: run scenarios on N CPU processes over gloo, and the tiny models, data and
training loops that both the N-process runs and the 1-process references use.

`launch(fn, world, tmp, *args)` spawns `world` processes (torch.multiprocessing's spawn start method), each
joining a gloo group through a FileStore in `tmp` (no ports) with a short timeout, runs fn(rank, world, *args)
and sends back its return value or its traceback. A process that outlives the deadline is killed (by the
handle of the process started here), so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import datetime
import os
import pickle
import sys
import time
import traceback

import torch
from torch import nn

IN, HID, OUT = 13, 11, 7  # odd sizes
ROWS = 5  # rows per rank and micro-batch
KINDS = ["lora", "inject_lora", "patch_peft", "adapter", "ia3_output", "ia3_input", "multi_lora"]
PG_TIMEOUT_S = 30
STALL_S = 8  # a stalled rank's silence: longer than the stall test's 4 s group timeout


# ----------------------------------------------------------------------------------------------- processes


def _entry(fn, rank, world, tmp, args, pg_timeout):
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = os.path.join(tmp, f"rank{rank}.pkl")
    code = 1
    try:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=pg_timeout))
        res = {"ok": True, "result": fn(rank, world, *args)}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(out + ".tmp", "wb") as f:
        pickle.dump(res, f)
    os.replace(out + ".tmp", out)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)  # no interpreter teardown: a group left broken by a failed peer must not hang the exit


def launch(fn, world: int, tmp, *args, timeout: float = 150.0, pg_timeout: float = PG_TIMEOUT_S) -> list[dict]:
    """fn(rank, world, *args) on `world` processes; per rank {"ok", "result" | "error", "exitcode", "seconds"}."""
    import torch.multiprocessing as mp

    tmp = str(tmp)
    os.makedirs(tmp, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, tmp, args, pg_timeout), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    ended = [None] * world
    for i, p in enumerate(procs):
        p.join(max(0.0, timeout - (time.monotonic() - t0)))
        ended[i] = time.monotonic() - t0
    outcomes = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()  # only the processes started here
            p.join()
            outcomes.append({"ok": False, "error": f"rank {r} still ran after {timeout} s (a hang): killed",
                             "exitcode": None, "seconds": timeout})
            continue
        path = os.path.join(tmp, f"rank{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                res = pickle.load(f)
        else:
            res = {"ok": False, "error": f"rank {r} exited with code {p.exitcode} and no result"}
        res.update(exitcode=p.exitcode, seconds=ended[r])
        outcomes.append(res)
    return outcomes


def results(outcomes: list[dict]) -> list:
    """Every rank's result; an AssertionError with each failed rank's traceback otherwise."""
    bad = [f"rank {r}: {o.get('traceback') or o['error']}" for r, o in enumerate(outcomes) if not o["ok"]]
    assert not bad, "\n".join(bad)
    return [o["result"] for o in outcomes]


# ----------------------------------------------------------------------------------------------- models and data


class Tiny(nn.Module):
    """q_proj -> gelu -> v_proj, with an o_proj left alone (PEFT-style names for inject_lora / patch_peft)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(IN, HID), nn.Linear(HID, OUT), nn.Linear(OUT, OUT)

    def forward(self, x):
        return self.o_proj(self.v_proj(torch.nn.functional.gelu(self.q_proj(x))))


class MultiNet(nn.Module):
    def __init__(self):
        super().__init__()
        import fastpeft

        self.a = fastpeft.MultiLoRALinear(nn.Linear(IN, HID), num_adapters=3, r=2, alpha=4)
        self.b = fastpeft.MultiLoRALinear(nn.Linear(HID, OUT), num_adapters=3, r=2, alpha=4)

    def forward(self, x, ids):
        return self.b(torch.nn.functional.gelu(self.a(x, ids)), ids)


def build(kind: str, seed: int = 0) -> nn.Module:
    """A tiny model with `kind`'s fastpeft layers; trainable parameters perturbed, so every gradient is non-zero."""
    import fastpeft

    torch.manual_seed(seed)
    if kind == "lora":
        model = nn.Sequential(fastpeft.LoRALinear(nn.Linear(IN, HID), r=3, alpha=6), nn.GELU(),
                              fastpeft.LoRALinear(nn.Linear(HID, OUT), r=2, alpha=4))
    elif kind == "inject_lora":
        model = fastpeft.inject_lora(Tiny(), ["q_proj", "v_proj"], r=3, alpha=6)
    elif kind == "patch_peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(Tiny(), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
        fastpeft.patch_peft(model)
    elif kind == "adapter":
        model = nn.Sequential(nn.Linear(IN, HID), fastpeft.BottleneckAdapter(HID, 5), nn.Linear(HID, OUT))
        model[0].requires_grad_(False)
        model[2].requires_grad_(False)
    elif kind.startswith("ia3"):
        mode = kind.split("_")[1]
        model = nn.Sequential(fastpeft.IA3Linear(nn.Linear(IN, HID), scale=mode), nn.GELU(),
                              fastpeft.IA3Linear(nn.Linear(HID, OUT), scale=mode))
    elif kind == "multi_lora":
        model = MultiNet()
    else:
        raise ValueError(kind)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def fastpeft_layers(model: nn.Module) -> list[nn.Module]:
    """The modules fully_shard is applied to, one per fastpeft (or PEFT LoRA) layer, innermost first."""
    import fastpeft
    from fastpeft.galore import GaLoreLinear

    kinds = (fastpeft.LoRALinear, fastpeft.BottleneckAdapter, fastpeft.IA3Linear, fastpeft.MultiLoRALinear, GaLoreLinear)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, kinds) or type(m).__name__ == "Linear" and hasattr(m, "lora_A"):  # PEFT's lora.Linear
            out.append(m)
    return out


def batch(kind: str, step: int, world: int, micro: int = 0):
    """The global batch of a step: (x [world·ROWS, IN], y, ids or None); rank r's shard is rows r·ROWS ..."""
    gen = torch.Generator().manual_seed(1000 + 17 * step + micro)
    n = world * ROWS
    x, y = torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen)
    ids = torch.randint(-1, 3, (n,), generator=gen) if kind == "multi_lora" else None
    return x, y, ids


def shard(t, rank, world, full_world):
    """Rows of `t` (a global batch of full_world ranks) that rank `rank` of `world` takes."""
    if t is None:
        return None
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def loss_of(model, kind, x, y, ids):
    out = model(x, ids) if kind == "multi_lora" else model(x)
    return torch.nn.functional.mse_loss(out.float(), y)


def _full(t):
    from fastpeft.distributed import is_dtensor

    t = t.detach()
    return (t.full_tensor() if is_dtensor(t) else t).clone().cpu()


def full_grads(model: nn.Module) -> dict:
    """name -> full copy of the gradient of every parameter that has one."""
    from fastpeft.distributed import unwrap

    return {n: _full(p.grad) for n, p in unwrap(model).named_parameters() if p.grad is not None}


def full_state(model: nn.Module) -> dict:
    """name -> full (gathered) detached CPU copy of every trainable parameter (DTensors are all-gathered)."""
    from fastpeft.distributed import unwrap

    return {n: _full(p) for n, p in unwrap(model).named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- training loops


def _wrap(model, mode):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in fastpeft_layers(model):
            fully_shard(m)
        fully_shard(model)
    return model


def train(kind: str, mode: str, rank: int = 0, world: int = 2, *, steps: int = 3, accum: int = 1,
          compile_backend=None, amp: bool = False, lr: float = 0.2) -> dict:
    """Train `kind`'s tiny model: mode "single" (this process, the whole global batch), "ddp" or "fsdp2" (this
    rank's shard). accum micro-batches per step, the first accum - 1 under fastpeft.distributed.no_sync."""
    import contextlib

    import fastpeft.distributed as fd

    model = build(kind)
    init = full_state(model)
    wrapped = _wrap(model, mode)
    fn = torch.compile(wrapped, backend=compile_backend) if compile_backend else wrapped
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=lr, momentum=0.5)
    losses = []
    for step in range(steps):
        for micro in range(accum):
            x, y, ids = batch(kind, step, 2, micro)
            if mode != "single":
                x, y, ids = (shard(t, rank, world, 2) for t in (x, y, ids))
            quiet = mode != "single" and micro < accum - 1
            with fd.no_sync(wrapped) if quiet else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                    loss = loss_of(fn, kind, x, y, ids) / accum
                loss.backward()
            losses.append(float(loss.detach()))
        if step == 0:
            grads = full_grads(wrapped)
        opt.step()
        opt.zero_grad()
    return {"init": init, "final": full_state(wrapped), "losses": losses, "grads": grads}


class Twice(nn.Module):
    """A square layer called twice in one forward, then a head."""

    def __init__(self):
        super().__init__()
        self.sq, self.head = nn.Linear(IN, IN), nn.Linear(IN, 9)

    def forward(self, x):
        return self.head(torch.tanh(self.sq(torch.tanh(self.sq(x)))))


def galore_model(seed: int = 0, projector: str = "svd", twice: bool = False):
    import fastpeft.galore as fg

    torch.manual_seed(seed)
    if twice:
        return fg.enable(Twice(), ["sq", "head"], rank=3, update_proj_gap=2, scale=0.5, projector=projector)
    model = nn.Sequential(nn.Linear(IN, 17), nn.Tanh(), nn.Linear(17, 9))
    fg.enable(model, ["0", "2"], rank=3, update_proj_gap=2, scale=0.5, projector=projector)
    return model


GALORE_R_NUMEL = 17 * 3 + 3 * 17  # layer 0: W [17, 13], right side, R [17, 3]; layer 2: W [9, 17], left, R [3, 17]
GALORE_W_NUMEL = 17 * 13 + 9 * 17


def _native_no_sync(wrapped):
    """The wrapper's own switch, not fastpeft.distributed.no_sync: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync(False)."""
    import contextlib

    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()

    @contextlib.contextmanager
    def off():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    return off()


def train_galore(mode: str, rank: int = 0, world: int = 2, *, projector: str = "svd", steps: int = 4,
                 accum: int = 1, bucket_cap_mb: float = 25.0, lr: float = 0.05, amp: bool = False,
                 compile_backend=None, native_no_sync: bool = False, twice: bool = False) -> dict:
    """Gradient-free GaLore on a 2-layer MLP (both layers targeted, biases trained by AdamW): mode "single",
    "ddp", "fsdp2" or "plain" (no wrapper: galore_data_parallel on the module, biases all-reduced here).
    Records the bases after every step and the bytes all-reduced (R buckets through a patched
    torch.distributed.all_reduce, DDP's buckets through a comm hook), with a "layer 0" marker where the
    backward reaches the first layer (what a bucket launched before it overlaps with)."""
    import contextlib

    import torch.distributed as dist

    import fastpeft.distributed as fd
    import fastpeft.galore as fg
    from fastpeft.optim import GaLoreAdamW

    model = galore_model(0, projector, twice)
    init = full_state(model)
    layers = [model.sq, model.head] if twice else [model[0], model[2]]
    wrapped, red, hook_bytes = model, None, [0]
    real_all_reduce = dist.all_reduce
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)

        def hook(state, bucket):  # DDP's default all-reduce, counted (and kept out of the patched count below)
            buf = bucket.buffer()
            hook_bytes[0] += buf.numel() * buf.element_size()
            return real_all_reduce(buf.div_(world), async_op=True).get_future().then(lambda f: f.value()[0])

        wrapped.register_comm_hook(None, hook)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in layers:
            fully_shard(m)
        fully_shard(model)
    if mode != "single":
        red = fd.galore_data_parallel(wrapped, bucket_cap_mb=bucket_cap_mb)
    fn = torch.compile(wrapped, backend=compile_backend) if compile_backend else wrapped
    opt = GaLoreAdamW(wrapped.parameters(), lr=lr, weight_decay=0.01)
    calls = []
    if mode != "single" and not compile_backend and not twice:
        model[1].register_full_backward_pre_hook(lambda *_: calls.append("layer 0"))  # the Tanh before layer 2's input

    def counting_all_reduce(tensor, *a, **k):
        calls.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *a, **k)

    torch.manual_seed(1234)  # the randomized refresh draws its seed here: the same stream in every run
    bases, traffic, grads_none, projected = [], [], True, []
    dist_patched = mode != "single"
    if dist_patched:
        dist.all_reduce = counting_all_reduce
    try:
        for step in range(steps):
            before = (red.stats() if red is not None else None, hook_bytes[0])
            calls.clear()
            for micro in range(accum):
                x, y, _ = batch("galore", step, 2, micro)
                y = y.new_zeros(y.shape[0], 9) + y[:, :1]  # 9 targets
                if mode != "single":
                    x, y = shard(x, rank, world, 2), shard(y, rank, world, 2)
                quiet = mode != "single" and micro < accum - 1
                no_sync = _native_no_sync if native_no_sync else fd.no_sync
                with no_sync(wrapped) if quiet else contextlib.nullcontext():
                    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                        loss = torch.nn.functional.mse_loss(fn(x).float(), y) / accum
                    loss.backward()
                grads_none &= all(getattr(m.weight, "grad", None) is None for m in layers)
            events = list(calls)
            r_calls = [c for c in calls if not isinstance(c, str)]  # buckets: launched in the backward
            st = [fg.galore_state(m) for m in layers]
            for s in st:
                s.wait_reduction()
            projected.append([(s.G if s.G is not None else s.R).clone() for s in st])  # what the step consumes
            if mode == "plain":
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(world)
                        real_all_reduce(p.grad)
            opt.step()
            grads_none &= all(getattr(m.weight, "grad", None) is None for m in layers)
            st = [fg.galore_state(m) for m in layers]
            bases.append([(None if s.P is None else s.P.clone(), None if s.Q is None else s.Q.clone()) for s in st])
            if red is not None:
                after = red.stats()
                traffic.append({"bucket_bytes": after["bytes_all_reduced"] - before[0]["bytes_all_reduced"],
                                "bucket_calls": after["calls"] - before[0]["calls"],
                                "refresh_bytes": after["bytes_refresh"] - before[0]["bytes_refresh"],
                                "patched_calls": r_calls, "events": events,
                                "ddp_hook_bytes": hook_bytes[0] - before[1]})
            opt.zero_grad()
    finally:
        if dist_patched:
            dist.all_reduce = real_all_reduce
    return {"init": init, "final": full_state(wrapped), "bases": bases, "traffic": traffic, "grads_none": grads_none,
            "projected": projected}


# ----------------------------------------------------------------------------------------------- a failing rank


def fail_mid_step(rank: int, world: int, what: str, fail_rank: int = 1, fail_step: int = 1) -> None:
    """Train (DDP LoRA, or gradient-free GaLore without a wrapper); rank fail_rank raises in the forward of step
    fail_step, after the others have entered the step. The others must end with an error, not hang."""
    if what == "ddp_lora":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(build("lora"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        import fastpeft.distributed as fd
        from fastpeft.optim import GaLoreAdamW

        model = galore_model(0, "randomized")
        fd.galore_data_parallel(model)
        opt = GaLoreAdamW(model.parameters(), lr=0.01)
    for step in range(3):
        x, y, _ = batch("lora", step, world)
        x = shard(x, rank, world, world)
        if rank == fail_rank and step == fail_step:
            if what.endswith("_stall"):  # alive but silent past the others' timeout
                time.sleep(STALL_S)
            raise RuntimeError(f"rank {rank} failed on purpose in step {step}")
        out = model(x)
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint(rank: int, world: int, mode: str, directory: str) -> dict:
    """save_adapter on every rank of a DDP / FSDP2 LoRA model, then load_adapter on every rank into another one."""
    import fastpeft

    wrapped = _wrap(build("inject_lora", seed=3), mode)
    path = fastpeft.save_adapter(wrapped, directory)  # collective: the first rank writes, every rank waits
    complete = all(os.path.exists(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_config.json"))
    saved = {n: t for n, t in full_state(wrapped).items() if "lora_" in n}
    fresh = _wrap(build("inject_lora", seed=4), mode)
    fastpeft.load_adapter(fresh, path)
    loaded = full_state(fresh)
    return {"path": path, "complete_on_return": complete, "saved": saved,
            "loaded_equal": all(torch.equal(loaded[n], t) for n, t in saved.items())}


# ----------------------------------------------------------------------------------------------- refusals


def unsupported(rank: int, world: int) -> dict:
    """The combinations that raise (the message of each, or None when nothing was raised)."""
    import fastpeft.distributed as fd
    import fastpeft.galore as fg
    from fastpeft.optim import GaLoreAdamW
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except (NotImplementedError, ValueError, RuntimeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    def tensor_parallel():  # a GaLore weight sharded on dim 1 (column parallel): not data parallelism
        model = galore_model()
        mesh = init_device_mesh("cpu", (world,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(1)]))
        fd.galore_data_parallel(model)

    def wrapped_before_enable():  # DDP built first: it would wait for the weights' gradients
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(IN, 17), nn.Tanh(), nn.Linear(17, 9))
        ddp = DDP(inner)
        fg.enable(inner, ["0", "2"], rank=3)
        fd.galore_data_parallel(ddp)

    def galore_group_on_dtensor():  # GaLoreAdamW's ordinary-gradient GaLore on an FSDP2-sharded weight
        torch.manual_seed(0)
        lin = nn.Linear(IN, 17)
        fully_shard(lin)
        opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2}, {"params": [lin.bias]}])
        lin(torch.randn(3, IN)).sum().backward()
        opt.step()

    attempt("tensor_parallel", tensor_parallel)
    attempt("wrapped_before_enable", wrapped_before_enable)
    attempt("galore_group_on_dtensor", galore_group_on_dtensor)
    return out
