"""Data-parallel training with fastpeft under PyTorch's own engines (DDP, FSDP2's fully_shard, torchrun), and
gradient-free GaLore whose rank-r projected gradient R is averaged across ranks by fastpeft itself.

LoRALinear (and inject_lora, patch_peft models), BottleneckAdapter, IA3Linear and MultiLoRALinear need nothing
from this module: their backward returns ordinary gradients, which DistributedDataParallel all-reduces and
FSDP2 reduce-scatters (no find_unused_parameters: every adapter parameter gets a gradient each step, the
MultiLoRA pool's unused slots a zero one). save_adapter / load_adapter know about process groups
(fastpeft.adapter_io).

Gradient-free GaLore (fastpeft.galore.enable) never forms a weight gradient: there is nothing for DDP or FSDP
to reduce. Its R (r·n numbers instead of m·n) is reduced here:

    model = fastpeft.galore.enable(model, ["q_proj", "v_proj"], rank=128)   # before wrapping
    ddp = DDP(model)                                   # enable() listed the targeted weights for DDP to skip
    fastpeft.distributed.galore_data_parallel(ddp)     # R averaged over ddp.process_group
    opt = fastpeft.optim.GaLoreAdamW(ddp.parameters(), lr=1e-3)
    with ddp.no_sync():  # or fastpeft.distributed.no_sync(ddp): accumulation micro-batches reduce nothing
        ddp(x1).loss.backward()
    ddp(x2).loss.backward(); opt.step(); opt.zero_grad()

    # FSDP2: fully_shard the blocks, then the root; GaLore weights are sharded like any other
    for block in model.model.layers: fully_shard(block)
    fully_shard(model)
    fastpeft.distributed.galore_data_parallel(model)   # GaLoreAdamW then updates each rank's rows

Without DDP or FSDP (you reduce the other gradients yourself), pass the module and a process_group.

Design of the R reduction
- What is reduced: each layer's fp32 R ([r, n], [m, r] or [r, r]; on an exact-SVD refresh step, 1 step in
  update_proj_gap, the full G instead). It is averaged: divided by the world size, then summed (DDP's
  convention), so w ranks on w shards equal one process on the concatenated batch with the loss averaged.
- When, and how it overlaps: in the backward of a micro-batch that syncs, right after a layer adds its
  contribution, its R joins the open bucket; a bucket that reaches bucket_cap_mb is flattened and its
  all-reduce launched with async_op=True, so it travels while autograd goes on through the earlier layers. The
  last bucket is launched by a callback at the end of the backward (autograd's queue_callback, as DDP does).
  GaLoreAdamW.step waits for the work in flight and copies the averages back into R before it reads R
  (opt.zero_grad and galore.disable wait too). Reductions run on the wrapper's process group (DDP's, the FSDP2
  mesh's, or the one passed); every rank issues them in the same order, the backward's.
- Which micro-batches sync: the wrapper's own switch, read in the backward: DDP's no_sync()
  (require_backward_grad_sync), FSDP2's set_requires_gradient_sync(False), or no_sync(model) here, which sets
  both. R of the other micro-batches accumulates locally and is averaged with the last one's, as .grad is.
- How ranks agree on the projector: exact SVD: G is averaged, every rank takes the SVD of the same G, and the
  first rank's basis is then broadcast so that the bases are bitwise equal whatever LAPACK / cuSOLVER do.
  Randomized: the sketch is reduced. The first rank's seed for Ω is broadcast, and each product G·Z and Gᵀ·Y of
  the range finder (2 + 2·power_iters skinny [m or n, rank + oversample] matrices) is averaged over the ranks,
  so every rank runs the range finder of the averaged gradient of the first micro-batch, which is what one
  process computes on the concatenated micro-batch (equal up to rounding; then the first rank's basis is
  broadcast, for bitwise equality). Not "compute the basis on one rank and broadcast it": that rank sees only
  its shard, and its basis is not the one a single process would find. These collectives are synchronous and
  run on refresh steps only (one in update_proj_gap).
- The weights: DDP would wait forever for their .grad; enable() lists them in the model's
  `_ddp_params_and_buffers_to_ignore` (DDP's own way of leaving parameters out) and marks them `_ddp_ignored`
  (its compiled form's). DDP does not broadcast ignored parameters at construction, so galore_data_parallel
  broadcasts them from the first rank. FSDP2 shards them like any parameter; it reduce-scatters only
  gradients that exist, so it waits for none; GaLoreAdamW applies the rank-r update W -= a·P·N to each rank's
  rows of the Shard(0) weight (a row block of P·N needs only the same rows of P, or of N: no communication).

Not supported yet (each raises NotImplementedError naming the layer and the reason): tensor parallelism and
HSDP (a GaLore weight that is a DTensor placed other than Shard(0) on a 1-D mesh), FSDP1
(FullyShardedDataParallel flattens parameters), and GaLoreAdamW's ordinary-gradient groups ("rank" in a param
group) on DTensor parameters. A copy (deepcopy, pickle) of a model is not attached to any process group.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .galore import GaLoreLinear, ddp_ignore_names, mark_ddp_ignored

__all__ = ["galore_data_parallel", "GaLoreReducer", "no_sync", "unwrap", "ignore_galore_weights", "galore_layers",
           "is_distributed", "is_dtensor", "local_rows"]

DEFAULT_BUCKET_CAP_MB = 25.0  # DDP's default


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("fastpeft.distributed: torch.distributed is not available in this build of torch")
    return dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized and `group` (default: the world) has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _ddp_types() -> tuple:
    from torch.nn.parallel import DistributedDataParallel

    return (DistributedDataParallel, nn.DataParallel)


def _fsdp_module_type():
    """FSDP2's FSDPModule when FSDP is in use (imported), else None: no model can be one otherwise."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    return getattr(sys.modules["torch.distributed.fsdp"], "FSDPModule", None)


def _is_fsdp1(model) -> bool:
    mod = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(mod, "FullyShardedDataParallel", None) if mod is not None else None
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel or torch.compile's wrapper (others as they are)."""
    while True:
        if isinstance(model, _ddp_types()):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def ignore_galore_weights(model: nn.Module) -> list[str]:
    """List the gradient-free GaLore weights of `model` (names relative to it) in its
    `_ddp_params_and_buffers_to_ignore`, for a DDP about to wrap it. enable() already does this for the model it
    was given; call this when you wrap a parent of that model instead. Returns the names."""
    mark_ddp_ignored(model)
    return ddp_ignore_names(model)


def local_rows(w: torch.Tensor, what: str = "weight") -> tuple[torch.Tensor, int]:
    """(the tensor of this rank's rows of w, the index of its first row): w itself and 0 for a plain tensor;
    for a DTensor sharded on dim 0 over a 1-D mesh (FSDP2), its local shard. Other placements (tensor
    parallelism, HSDP) raise NotImplementedError."""
    if not is_dtensor(w):
        return w, 0
    _check_placement(w, what)
    local = w.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        return local, int(offset[0])
    except (ImportError, TypeError, ValueError):  # torch.chunk's split, which Shard(0) follows
        mesh = w.device_mesh
        size, idx = mesh.size(0), mesh.get_local_rank(0)
        chunk = -(-w.shape[0] // size)
        return local, min(idx * chunk, w.shape[0])


def _check_placement(w, what: str) -> None:
    from torch.distributed.tensor import Shard

    mesh, placements = w.device_mesh, tuple(w.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(
            f"{what}: a DTensor placed {placements} on a {mesh.ndim}-D device mesh; gradient-free GaLore supports data "
            "parallelism only (DDP, or FSDP2 sharding dim 0 over a 1-D mesh): tensor parallelism and HSDP are not "
            "supported yet")


class _Bucket:
    """R (or G) tensors of several layers all-reduced as one flat buffer."""

    __slots__ = ("states", "tensors", "nbytes", "flat", "work", "inplace")

    def __init__(self):
        self.states, self.tensors, self.nbytes, self.flat, self.work, self.inplace = [], [], 0, None, None, False

    def names(self) -> str:
        names = [st.name or "?" for st in self.states]
        return ", ".join(repr(n) for n in names[:5]) + (f" ... and {len(names) - 5} more" if len(names) > 5 else "")


class GaLoreReducer:
    """Averages the projected gradients of a model's gradient-free GaLore layers across a data-parallel group
    (made by galore_data_parallel; each layer's GaLoreLinearState holds it as `.reducer`).

    Counters (per process, since the last reset_stats): `bytes_all_reduced` and `calls`: R / G buckets;
    `bytes_refresh` and `refresh_calls`: a refresh's seed, sketch products and basis broadcasts."""

    def __init__(self, states, group, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, sync=None):
        dist = _dist()
        if not isinstance(bucket_cap_mb, (int, float)) or isinstance(bucket_cap_mb, bool) or bucket_cap_mb < 0:
            raise ValueError(f"bucket_cap_mb: expected a number >= 0, got {bucket_cap_mb!r}")
        self.states = list(states)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2 ** 20)
        self._sync = dict(sync or {})  # id(state) -> callable() -> bool: the wrapper's "sync gradients now"
        self._local = 0  # depth of no_sync() contexts
        self._open: dict = {}  # device -> the bucket being filled
        self._inflight: list[_Bucket] = []
        self._callback_queued = False
        self.reset_stats()

    # -- counters -------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.bytes_all_reduced = self.calls = self.bytes_refresh = self.refresh_calls = 0

    def stats(self) -> dict:
        return {"bytes_all_reduced": self.bytes_all_reduced, "calls": self.calls,
                "bytes_refresh": self.bytes_refresh, "refresh_calls": self.refresh_calls}

    # -- which backward syncs ---------------------------------------------------------------------------------
    def sync_now(self, st) -> bool:
        if self._local:
            return False
        f = self._sync.get(id(st))
        return True if f is None else bool(f())

    @contextlib.contextmanager
    def no_sync(self):
        """R of the backward passes run inside accumulates locally (gradient accumulation)."""
        self._local += 1
        try:
            yield
        finally:
            self._local -= 1

    # -- R / G buckets ----------------------------------------------------------------------------------------
    def before_accumulate(self, st) -> None:
        b = st.pending
        if b is not None and b.work is not None:  # launched: its average must land before more is added
            self.wait()

    def ready(self, st, t: torch.Tensor) -> None:
        """st's R (or G) holds everything of this step: queue it for the all-reduce."""
        if st.pending is not None:  # already in a bucket not launched yet: updated in place, nothing to do
            return
        b = self._open.get(t.device)
        if b is None:
            b = self._open[t.device] = _Bucket()
        b.states.append(st)
        b.tensors.append(t)
        b.nbytes += t.numel() * t.element_size()
        st.pending = b
        if b.nbytes >= self.bucket_cap_bytes:
            self._launch(t.device)
        self._queue_end_of_backward()

    def _queue_end_of_backward(self) -> None:
        if self._callback_queued or not self._open:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        except RuntimeError:  # not inside a backward pass (a direct call): launch now
            self._launch_all()

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._launch_all()

    def _launch(self, device) -> None:
        b = self._open.pop(device, None)
        if b is None:
            return
        dist = _dist()
        one = b.tensors[0]
        b.inplace = len(b.tensors) == 1 and one.is_contiguous()
        # one layer: reduced in place (nothing touches R until the wait); several: flattened into one buffer
        flat = one.view(-1) if b.inplace else torch.cat([t.reshape(-1) for t in b.tensors])
        flat.div_(self.world_size)
        b.flat = flat
        b.work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.bytes_all_reduced += flat.numel() * flat.element_size()
        self.calls += 1
        self._inflight.append(b)

    def _launch_all(self) -> None:
        for device in list(self._open):
            self._launch(device)

    def wait(self) -> None:
        """Launch what is still open, wait for every all-reduce in flight, and copy the averages into R / G."""
        self._launch_all()
        inflight, self._inflight = self._inflight, []
        failed = None
        for b in inflight:
            try:
                if failed is None:
                    b.work.wait()
            except Exception as exc:  # noqa: BLE001 - any failure of the collective: name the layers, keep the cause
                failed = (b, exc)
            if failed is None and not b.inplace:
                o = 0
                for t in b.tensors:
                    n = t.numel()
                    t.copy_(b.flat[o:o + n].view_as(t))
                    o += n
            for st in b.states:
                st.pending = None
        if failed is not None:
            b, exc = failed
            raise RuntimeError(
                f"fastpeft.distributed: the all-reduce of the GaLore projected gradients of layers {b.names()} failed "
                f"({type(exc).__name__}: {exc}); another rank has probably failed or stopped, or the process group "
                "timed out. R is not averaged: do not step") from exc

    # -- refresh collectives (synchronous, on refresh steps only) -------------------------------------------------
    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """The average of t over the ranks (fp32; t may be overwritten)."""
        out = t.float().contiguous()
        out.div_(self.world_size)
        _dist().all_reduce(out, group=self.group)
        self.bytes_refresh += out.numel() * out.element_size()
        self.refresh_calls += 1
        return out

    def shared_seed(self, seed: int, device) -> int:
        """The first rank's seed, on every rank."""
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        _dist().broadcast(t, src=self.src, group=self.group)
        self.bytes_refresh += 8
        self.refresh_calls += 1
        return int(t.item())

    def same_basis(self, basis):
        """The first rank's basis (P, Q), broadcast in place."""
        for t in basis:
            if t is not None:
                _dist().broadcast(t, src=self.src, group=self.group)
                self.bytes_refresh += t.numel() * t.element_size()
                self.refresh_calls += 1
        return basis

    def broadcast_weights(self, weights) -> None:
        with torch.no_grad():
            for w in weights:
                _dist().broadcast(w.data, src=self.src, group=self.group)

    def detach(self) -> None:
        """Stop reducing: wait for the work in flight and detach from every layer."""
        self.wait()
        for st in self.states:
            if st.reducer is self:
                st.reducer = None


def _fsdp_sync(owner):
    def sync() -> bool:
        try:
            groups = owner._get_fsdp_state()._fsdp_param_groups  # what set_requires_gradient_sync sets
        except AttributeError:
            return True
        return all(getattr(g, "reduce_grads", True) for g in groups)

    return sync


def _owner(root: nn.Module, name: str, cls):
    """The nearest module at or above root.<name> that is an instance of cls (None if none)."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        mod = root.get_submodule(".".join(parts[:i]))
        if isinstance(mod, cls):
            return mod
    return None


def galore_data_parallel(model: nn.Module, process_group=None, *, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
                         broadcast: bool = True) -> GaLoreReducer:
    """Average the projected gradient R of every gradient-free GaLore layer of `model` across its data-parallel
    group (see the module docstring for the design). Call it on every rank, after wrapping, before training.

    model: a DistributedDataParallel (R over its process group; its no_sync() is followed), an FSDP2 root
    (fully_shard; R over the weights' mesh; set_requires_gradient_sync is followed), or a plain module
    (R over process_group, default the world). bucket_cap_mb: R is launched in buckets of this size (0: one
    all-reduce per layer). broadcast: copy the first rank's replicated GaLore weights to every rank (DDP skips
    them at construction; FSDP2-sharded weights are left as they are).
    Returns the GaLoreReducer (its counters say what was reduced). Calling it again replaces the previous one.
    """
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("galore_data_parallel: torch.distributed is not initialized (init_process_group first)")
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or bucket_cap_mb < 0:
        raise ValueError(f"bucket_cap_mb: expected a number >= 0, got {bucket_cap_mb!r}")
    ddp_cls = _ddp_types()[0]
    if isinstance(model, nn.DataParallel):
        raise NotImplementedError("galore_data_parallel: nn.DataParallel replicates the module on every call, which "
                                  "drops the GaLore state's link; use DistributedDataParallel")
    inner, group, sync_of = model, process_group, None
    if isinstance(model, ddp_cls):
        inner = model.module
        group = process_group if process_group is not None else model.process_group
        ignored = set(model.parameters_to_ignore)
        missing = [n for n in ddp_ignore_names(inner) if n not in ignored]
        if missing:
            raise ValueError(
                f"galore_data_parallel: DistributedDataParallel does not ignore the gradient-free GaLore weights "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, and would wait for their gradients, which never "
                "exist: call fastpeft.galore.enable on the module before wrapping it in DDP (or "
                "fastpeft.distributed.ignore_galore_weights(module) before DDP when enable() got a submodule)")
        sync_of = lambda st: (lambda: model.require_backward_grad_sync)  # noqa: E731
    inner = unwrap(inner)
    if _is_fsdp1(inner):
        raise NotImplementedError("galore_data_parallel: FSDP1 (FullyShardedDataParallel) flattens parameters, which "
                                  "gradient-free GaLore cannot update; use FSDP2 (torch.distributed.fsdp.fully_shard)")
    layers = galore_layers(inner)
    if not layers:
        raise ValueError(f"galore_data_parallel: {type(inner).__name__} has no gradient-free GaLore layers "
                         "(fastpeft.galore.enable)")
    fsdp_cls = _fsdp_module_type()
    sync, mesh_group, replicated = {}, None, []
    for name, mod in layers:
        w = mod.weight
        if is_dtensor(w):
            _check_placement(w, f"layer {name!r}: weight")
            g = w.device_mesh.get_group()
            if mesh_group is not None and g is not mesh_group:
                raise NotImplementedError(f"galore_data_parallel: layer {name!r} is sharded over another device mesh "
                                          "than the other GaLore layers; one data-parallel mesh is supported")
            mesh_group = g
        else:
            replicated.append(w)
        owner = _owner(inner, name, fsdp_cls) if fsdp_cls is not None else None
        if sync_of is not None:
            sync[id(mod.galore)] = sync_of(mod.galore)
        elif owner is not None:
            sync[id(mod.galore)] = _fsdp_sync(owner)
    if group is None:
        group = mesh_group if mesh_group is not None else dist.group.WORLD
    for _, mod in layers:  # a previous reducer: let its work land first
        if mod.galore.reducer is not None:
            mod.galore.reducer.detach()
    reducer = GaLoreReducer([mod.galore for _, mod in layers], group, bucket_cap_mb, sync)
    for _, mod in layers:
        mod.galore.reducer = reducer
        mod._link()  # FSDP2 registered new (sharded) Parameters: give the optimizer the way to the state
    if broadcast and replicated:
        reducer.broadcast_weights(replicated)
    return reducer


def galore_layers(model: nn.Module) -> list[tuple[str, GaLoreLinear]]:
    """(name, layer) of every gradient-free GaLore layer of model (a wrapper is looked through)."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, GaLoreLinear)]


def _reducers(model: nn.Module) -> list[GaLoreReducer]:
    seen = {}
    for mod in unwrap(model).modules():
        if isinstance(mod, GaLoreLinear) and mod.galore.reducer is not None:
            seen[id(mod.galore.reducer)] = mod.galore.reducer
    return list(seen.values())


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Gradient accumulation without communication, for every kind of gradient of `model`: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync(False) (restored to True on exit), and the GaLore reducers' local accumulation.
    Run the forward and backward of the accumulation micro-batches inside; the last micro-batch outside."""
    fsdp_cls = _fsdp_module_type()
    with contextlib.ExitStack() as stack:
        if isinstance(model, _ddp_types()[0]):
            stack.enter_context(model.no_sync())
        elif fsdp_cls is not None and isinstance(model, fsdp_cls):
            model.set_requires_gradient_sync(False)
            stack.callback(model.set_requires_gradient_sync, True)
        for r in _reducers(model):
            stack.enter_context(r.no_sync())
        yield
