"""Gradient-free GaLore for nn.Linear layers: the [out, in] weight gradient never exists.

    model = fastpeft.galore.enable(model, target_modules=["q_proj", "v_proj"], rank=128, update_proj_gap=200, scale=0.25)
    opt = fastpeft.optim.GaLoreAdamW(model.parameters(), lr=1e-3)

The targeted layers become GaLoreLinear (an nn.Linear subclass, same parameters and state_dict keys). Their
backward accumulates the projected gradient R (see fastpeft.ops.galore_linear) into the fp32 buffer of the
layer's GaLoreLinearState (`layer.galore`); the weight's .grad stays None. GaLoreAdamW runs Adam on R and
applies W <- W - lr·s·P·N in place with a rank-r update kernel. Micro-batches accumulate into R exactly as
gradients do (R is linear in G).

The state belongs to the module, so copy.deepcopy, pickle and torch.save of the model carry it (and
model.to() moves the basis); the weight only holds a link to it for the optimizer (`_fastpeft_galore`),
re-made whenever the module is copied, loaded or run. The optimizer's state_dict carries the basis and the
step count, so model.state_dict() + opt.state_dict() is a complete checkpoint.

The step consumes R, so loops that clear gradients with model.zero_grad() stay correct; to discard an
accumulated R without stepping call opt.zero_grad() (model.zero_grad() does not see R).

Projector refresh (when the layer's step count is a multiple of update_proj_gap: steps 0, gap, 2·gap, ...):
- projector="randomized" (default): the backward of the first micro-batch of a refresh step computes the
  new basis from that micro-batch's X and dY with a randomized range finder (sketch G·Ω = dYᵀ·(X·Ω), power
  iterations through X and dY, QR, Rayleigh-Ritz), never forming G, then projects with it; later
  micro-batches of the step use the same basis. Without gradient accumulation the basis approximates the
  exact SVD basis of the step's gradient; with accumulation it is the basis of the first micro-batch's
  gradient (the summed gradient is not available until the last micro-batch). R and the update are exact
  for that basis either way.
- projector="svd": exact parity with GaLoreAdamW fed the full gradient (and with galore-torch). On a
  refresh step the backward accumulates the layer's full gradient G (fp32 [out, in]) over the step's
  micro-batches, and the optimizer takes the SVD of G, projects it and frees it. So G exists on refresh
  steps (1 in update_proj_gap) and costs the full-gradient memory there.
Moments on a projector change: "keep" (default; galore-torch's behaviour, so trajectories match it),
"reset" (zero them), or "rotate" (carry them into the new basis, fastpeft.optim.projector.rotate_moments).

Non-finite gradients: on a refresh step a gradient with inf/NaN raises FloatingPointError naming the layer
before the basis, the moments or the weight change (randomized: in the backward; svd: in opt.step()).
Checking costs a host sync, which the refresh's SVD makes anyway; other steps are not checked.

Data parallelism (DDP, FSDP2, or a process group of your own): call fastpeft.distributed.galore_data_parallel
on the wrapped model. R (G on an exact-SVD refresh step) is then averaged across the data-parallel group by
fastpeft, asynchronously and in buckets launched from the layers' backward, and GaLoreAdamW.step waits for it
before it reads R; a randomized refresh reduces its sketch so that every rank computes the range finder of
the averaged gradient (see fastpeft.distributed). enable() lists the targeted weights in the model's
`_ddp_params_and_buffers_to_ignore` (and marks each weight `_ddp_ignored`), so that DistributedDataParallel,
which would otherwise wait for their never-written .grad, leaves them alone; wrap the model after enable().
Under torch.distributed with more than one rank and no galore_data_parallel, the first backward warns: each
rank would then train its own weights.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .ops.galore_linear import full_grad_accumulate, galore_linear, kernel_backend, projected_grad_accumulate
from .ops.galore_linear_custom_op import GaLoreStateRef
from .optim import projector as pj
from .targets import IN_PLACE, refusal, select_targets

__all__ = ["enable", "disable", "GaLoreLinear", "GaLoreLinearState", "galore_state"]

_ATTR = "_fastpeft_galore"


class GaLoreLinearState:
    """GaLore state of one gradient-free weight: settings, current basis, the accumulated R (or G)."""

    def __init__(self, shape, rank, update_proj_gap, scale, proj_type, projector, moments, oversample, power_iters, backend):
        self.shape = tuple(shape)
        self.rank = pj.check_rank(rank, self.shape)
        self.update_proj_gap = pj.check_positive_int("update_proj_gap", update_proj_gap)
        self.scale = pj.check_scale(scale)
        self.proj_type = pj.check_proj_type(proj_type)
        self.projector = pj.check_choice("projector", projector, pj.PROJECTORS)
        self.moments = pj.check_choice("moments", moments, pj.MOMENT_POLICIES)
        self.oversample = pj.check_nonneg_int("oversample", oversample)
        self.power_iters = pj.check_nonneg_int("power_iters", power_iters)
        self.backend = backend
        self.name = ""  # the layer's name in the model, for error messages
        self.side = pj.projection_side(self.shape, proj_type)
        self.P = self.Q = None
        self.prev = (None, None)  # the basis the moments are expressed in, while a refresh is pending
        self.refreshed = False
        self.refresh_due = True
        self.R = None
        self.has_R = False
        self.G = None
        self.op_ref = GaLoreStateRef(self)  # how compiled graphs reach this state (galore_linear_custom_op)
        self.reducer = None  # a fastpeft.distributed.GaLoreReducer under data parallelism (not copied or pickled)
        self.pending = None  # the reducer's bucket holding this state's R / G while its all-reduce is in flight

    def __getstate__(self):  # pickle, deepcopy: a copy is not attached to this process's process group
        state = dict(self.__dict__)
        state["reducer"] = state["pending"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("reducer", None)  # a state pickled before data-parallel support
        self.__dict__.setdefault("pending", None)

    def wait_reduction(self) -> None:
        """Wait for the data-parallel all-reduce of this state's R / G, if one is in flight (GaLoreAdamW.step
        calls it before it reads R)."""
        if self.reducer is not None:
            self.reducer.wait()

    def set_basis(self, new) -> None:
        if not self.refreshed:
            self.prev = (self.P, self.Q)
        self.P, self.Q = new
        self.refreshed = True

    def load_basis(self, p, q, step: int) -> None:
        self.P, self.Q = p, q
        self.prev, self.refreshed = (None, None), False
        self.refresh_due = step % self.update_proj_gap == 0 or (p is None and q is None)
        self.discard()

    def discard(self) -> None:
        """Drop the accumulated R / G (what zero_grad does to .grad); an all-reduce in flight is waited for first."""
        self.wait_reduction()
        self.has_R = False
        self.G = None

    def accumulate(self, x2: torch.Tensor, dy2: torch.Tensor) -> None:
        """Called by the backward with this micro-batch's X [M, in] and dY [M, out]."""
        red = self.reducer
        if red is None:
            _warn_if_unreduced(self)
        else:
            # an all-reduce of this R already in flight (the layer ran twice in one forward, or a micro-batch follows
            # a synced one before the step) is waited for first; averaging the average again leaves it unchanged
            red.before_accumulate(self)
        backend = kernel_backend(self.backend, x2)
        if self.refresh_due and self.projector == "svd":
            if self.G is None:
                self.G = torch.zeros(self.shape, device=x2.device, dtype=torch.float32)
            full_grad_accumulate(x2, dy2, self.G, backend)
            if red is not None and red.sync_now(self):
                red.ready(self, self.G)
            return
        # under data parallelism every rank takes part in the refresh's collectives, an empty micro-batch too
        if self.refresh_due and (x2.shape[0] > 0 or red is not None):
            seed = int(torch.randint(0, 2**62, ()))
            if red is not None:
                seed = red.shared_seed(seed, x2.device)  # the same sketch Ω on every rank
            gen = torch.Generator(device=x2.device)
            gen.manual_seed(seed)
            try:
                new = pj.randomized_basis_factored(x2, dy2, self.rank, self.side, oversample=self.oversample,
                                                   power_iters=self.power_iters, generator=gen,
                                                   reduce=None if red is None else red.mean_)
            except pj.NonFiniteError:
                raise FloatingPointError(
                    f"galore: layer {self.name!r}: non-finite gradient (X or dY holds inf/NaN) on a projector refresh "
                    "step; the weight, its basis and the optimizer are unchanged (opt.zero_grad() and skip the batch)") from None
            if red is not None:
                new = red.same_basis(new)
            self.set_basis(new)
            self.refresh_due = False
        if self.P is None and self.Q is None:
            return  # an empty first micro-batch: no basis yet, and nothing to project
        shape = pj.low_rank_shape(self.shape, self.rank, self.side)
        if self.R is None or self.R.device != x2.device:
            self.R = torch.zeros(shape, device=x2.device, dtype=torch.float32)
        elif not self.has_R:
            self.R.zero_()
        self.has_R = True
        projected_grad_accumulate(x2, dy2, self.P, self.Q, self.R, backend)
        if red is not None and red.sync_now(self):
            red.ready(self, self.R)

    def to_(self, fn) -> None:
        """Follow the module through Module._apply(fn) (.to, .cuda, .half, ...): the basis takes fn like the
        weight (it is stored in the weight's dtype); the fp32 accumulators only change device."""
        def conv(t):
            return None if t is None else fn(t)

        def move(t):
            return None if t is None else t.to(fn(t.new_empty(0)).device)

        self.P, self.Q = conv(self.P), conv(self.Q)
        self.prev = tuple(conv(t) for t in self.prev)
        self.R, self.G = move(self.R), move(self.G)


_warned_unreduced = False


def _warn_if_unreduced(st: GaLoreLinearState) -> None:
    global _warned_unreduced
    if _warned_unreduced:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _warned_unreduced = True
        warnings.warn(
            f"galore: layer {st.name!r}: torch.distributed runs {dist.get_world_size()} ranks, but the projected "
            "gradient R of gradient-free GaLore layers is not reduced across them (DDP and FSDP skip these weights): "
            "each rank trains its own weights. For data-parallel training call "
            "fastpeft.distributed.galore_data_parallel(model) after wrapping the model", stacklevel=3)


def ddp_ignore_names(root: nn.Module) -> list[str]:
    """The names (relative to root) of the weights of root's gradient-free GaLore layers."""
    return [f"{name}.weight" if name else "weight" for name, mod in root.named_modules() if isinstance(mod, GaLoreLinear)]


def mark_ddp_ignored(root: nn.Module) -> None:
    """Add root's gradient-free weights to root._ddp_params_and_buffers_to_ignore (what
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model sets), keeping names already there."""
    names = list(getattr(root, "_ddp_params_and_buffers_to_ignore", None) or [])
    names += [n for n in ddp_ignore_names(root) if n not in names]
    root._ddp_params_and_buffers_to_ignore = names


class GaLoreLinear(nn.Linear):
    """An nn.Linear in gradient-free GaLore mode; made by enable() (in place, by changing the module's
    class), turned back by disable(). `galore` is its GaLoreLinearState."""

    galore: GaLoreLinearState

    def _link(self) -> None:
        # the optimizer only sees the weight: give it the way to the state. A copied, loaded or replaced
        # Parameter has lost it (Parameter.__deepcopy__ drops attributes): every such path re-makes it.
        if getattr(self.weight, _ATTR, None) is not self.galore:
            setattr(self.weight, _ATTR, self.galore)
            # DDP (and its compiled form) skips it: its gradient is never written, as R instead (see the docstring)
            self.weight._ddp_ignored = True
        if not isinstance(getattr(self.galore, "op_ref", None), GaLoreStateRef):  # a state pickled before op_ref
            self.galore.op_ref = GaLoreStateRef(self.galore)

    def forward(self, x):
        if not torch.compiler.is_compiling():  # a weight assigned by hand; compiled code sees enable()'s link
            self._link()
        return galore_linear(x, self.weight, self.bias, self.galore)

    def __setstate__(self, state):  # pickle, torch.load and copy.deepcopy
        super().__setstate__(state)
        self._link()

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict(assign=True) replaces the weight
        super()._load_from_state_dict(*args, **kwargs)
        self._link()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.galore.to_(fn)
        self._link()
        return self

    def extra_repr(self) -> str:
        st = self.galore
        return (f"{super().extra_repr()}, galore_rank={st.rank}, update_proj_gap={st.update_proj_gap}, "
                f"scale={st.scale}, proj_type={st.proj_type!r}, projector={st.projector!r}")


def galore_state(obj) -> GaLoreLinearState | None:
    """The gradient-free GaLore state of a weight (or of a GaLoreLinear layer), or None."""
    if isinstance(obj, GaLoreLinear):
        return obj.galore
    return getattr(obj, _ATTR, None) if isinstance(obj, torch.Tensor) else None


def enable(model: nn.Module, target_modules, rank: int, update_proj_gap: int = 200, scale: float = 1.0,
           proj_type: str = "std", projector: str = "randomized", moments: str = "keep",
           oversample: int = pj.DEFAULT_OVERSAMPLE, power_iters: int = pj.DEFAULT_POWER_ITERS, backend=None, *,
           exclude_modules=None) -> nn.Module:
    """Put the nn.Linear layers named by target_modules into gradient-free GaLore mode (in place; returns model).

    target_modules / exclude_modules: PEFT's rules (fastpeft.targets): module names or name suffixes, or a
    regex string matched in full.
    rank, update_proj_gap, scale, proj_type: as in GaLoreAdamW's param groups. projector: "randomized"
    (never forms G) or "svd" (exact; forms G on refresh steps). moments: "keep" | "reset" | "rotate".
    """
    chosen = select_targets(model, target_modules, exclude_modules)
    states = []
    owners = {}
    for name, mod in chosen:
        if isinstance(mod, GaLoreLinear) or (isinstance(mod, nn.Linear) and galore_state(mod.weight) is not None):
            raise ValueError(f"target_modules: {name!r} is already in gradient-free GaLore mode (or shares its weight with such a layer)")
        if type(mod) is not nn.Linear:
            raise TypeError(f"target_modules: {name!r} is a {type(mod).__name__}, expected an nn.Linear")
        why = refusal(model, name, mod, how=IN_PLACE, noun="gradient-free GaLore")
        if why is not None:
            raise ValueError(f"target_modules: {why}")
        if id(mod.weight) in owners:  # tied weights: one weight, one projected gradient
            raise ValueError(f"target_modules: {name!r} shares its weight with {owners[id(mod.weight)]!r}; "
                             "gradient-free GaLore needs a weight used by one layer only")
        owners[id(mod.weight)] = name
        try:
            st = GaLoreLinearState(mod.weight.shape, rank, update_proj_gap, scale, proj_type, projector, moments,
                                   oversample, power_iters, backend)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        st.name = name
        states.append((mod, st))
    for mod, st in states:  # all validated: nothing is changed on an error path
        mod.__class__ = GaLoreLinear  # in place: references to the layer and its weight stay valid
        mod.galore = st
        mod._link()
    mark_ddp_ignored(model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Restore the ordinary forward of every gradient-free layer (their GaLore bases and R are dropped)."""
    gone = set(ddp_ignore_names(model))
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
    if ignored is not None:
        model._ddp_params_and_buffers_to_ignore = [n for n in ignored if n not in gone]
    for mod in model.modules():
        if isinstance(mod, GaLoreLinear):
            mod.galore.wait_reduction()
            for attr in (_ATTR, "_ddp_ignored"):
                if attr in mod.weight.__dict__:
                    delattr(mod.weight, attr)
            del mod.galore
            mod.__class__ = nn.Linear
    return model
