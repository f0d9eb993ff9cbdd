"""GaLoreAdamW: AdamW whose moments live in a rank-r projection of each matrix's gradient (Zhao et al., 2024).

Semantics follow the galore-torch package (GaLoreAdamW, v1.0), so that switching is a change of import:
- param groups carry "rank" (turns GaLore on), "update_proj_gap", "scale", "proj_type"; parameters of
  groups without "rank" get plain AdamW;
- the projector of a parameter is refreshed when its step counter (steps taken so far, before this one)
  is a multiple of update_proj_gap: steps 0, gap, 2·gap, ...;
- the update is transformers' AdamW: m, v of R, N = m / (sqrt(v) + eps) (eps outside the bias correction),
  W <- W - lr·sqrt(1-b2^t)/(1-b1^t)·scale·back(N), then decoupled decay W <- W - lr·wd·W on the updated W;
- defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, correct_bias=True.

Deliberate differences from galore-torch:
- moments are fp32 whatever the parameter dtype (galore-torch keeps them in the gradient's dtype);
- bases are sign-normalised (see fastpeft.optim.projector), galore-torch keeps LAPACK's signs; the two agree
  exactly up to the first refresh that happens while moments exist, and after it whenever the signs agree;
- the side of the back-projection is the side chosen at projection time (galore-torch re-derives it from
  the low-rank shape, which breaks reverse_std with rank == min(m, n));
- missing "update_proj_gap", "scale", "proj_type" default to 200, 1.0, "std" (galore-torch raises KeyError);
  bad ranks and proj_types raise ValueError at construction, not at the first step;
- extra group keys: "projector" ("svd" or "randomized" range finder), "moments" on a refresh ("keep", the
  reference's behaviour and the default so that trajectories match it; "reset"; or "rotate" into the new
  basis), "oversample" and "power_iters" for the range finder;
- the state is plain tensors and ints (no pickled projector object): state_dict loads with weights_only;
- hyperparameters must be finite (lr=inf is a ValueError, at construction and at each step, where a
  scheduler may have set it); a gradient with inf/NaN on a projector refresh step raises FloatingPointError
  naming the parameter before any parameter or state changes (galore-torch's SVD fails on it, or returns
  NaN on a GPU). Checking costs a host sync that the refresh's SVD makes anyway; other steps are not checked,
  as in torch.optim.AdamW.

Parameters of nn.Linear layers put into gradient-free mode by fastpeft.galore.enable are recognised and
stepped from their accumulated projected gradient; their GaLore settings come from enable().

Data parallelism (fastpeft.distributed): step() first waits for the all-reduce of every gradient-free layer's
R still in flight; on an exact-SVD refresh the first rank's basis is broadcast. Parameters that are DTensors
(FSDP2's fully_shard): AdamW groups keep DTensor moments; a gradient-free weight sharded on dim 0 gets the
rank-r update on its local rows (its basis, R and moments are replicated, small); ordinary-gradient GaLore
groups ("rank") on DTensors raise NotImplementedError.
"""
from __future__ import annotations

import math
import numbers
import sys

import torch

from .._backend import resolve_backend
from . import projector as pj

_GALORE_KEYS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}


def _triton():
    from ..kernels import galore as k

    return k


def _check_number(name, value, lo=None, lo_open=False, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value or abs(value) == math.inf:
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name}: expected {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value >= hi:
        raise ValueError(f"{name}: expected < {hi}, got {value!r}")


def _galore_state(p):
    return getattr(p, "_fastpeft_galore", None)


def _is_dtensor(t) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection for param groups that set "rank"; same constructor as
    galore_torch.GaLoreAdamW. backend: "auto" | "torch" | "triton" | "cublas" (see fastpeft._backend; "cublas":
    projections and the weight update by cuBLAS, the Adam step by the Triton kernel)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 no_deprecation_warning=False, *, projector="svd", moments="keep",
                 oversample=pj.DEFAULT_OVERSAMPLE, power_iters=pj.DEFAULT_POWER_ITERS, backend=None):
        del no_deprecation_warning  # accepted for galore-torch compatibility; nothing here is deprecated
        self.backend = backend
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias,
                    "projector": projector, "moments": moments, "oversample": oversample, "power_iters": power_iters}
        self._validate_hyper(defaults)
        super().__init__(params, defaults)

    # -- validation -------------------------------------------------------------------------------------
    @staticmethod
    def _validate_hyper(g):
        if "lr" in g:
            _check_number("lr", g["lr"], lo=0.0)
        if "betas" in g:
            betas = g["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
            for i, b in enumerate(betas):
                _check_number(f"betas[{i}]", b, lo=0.0, hi=1.0)
        if "eps" in g:
            _check_number("eps", g["eps"], lo=0.0)
        if "weight_decay" in g:
            _check_number("weight_decay", g["weight_decay"], lo=0.0)
        if "projector" in g:
            pj.check_choice("projector", g["projector"], pj.PROJECTORS)
        if "moments" in g:
            pj.check_choice("moments", g["moments"], pj.MOMENT_POLICIES)
        if "oversample" in g:
            pj.check_nonneg_int("oversample", g["oversample"])
        if "power_iters" in g:
            pj.check_nonneg_int("power_iters", g["power_iters"])

    def add_param_group(self, param_group):
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        self._validate_hyper(group)
        if "rank" in group:
            for key, default in _GALORE_KEYS.items():
                group.setdefault(key, default)
            pj.check_proj_type(group["proj_type"])
            pj.check_positive_int("update_proj_gap", group["update_proj_gap"])
            group["scale"] = pj.check_scale(group["scale"])
            for i, p in enumerate(params):
                p = p[1] if isinstance(p, tuple) else p  # (name, parameter) from named_parameters()
                if _galore_state(p) is not None:
                    raise ValueError(f"params[{i}]: this weight is in gradient-free GaLore mode (fastpeft.galore.enable), "
                                     "which sets its rank; put it in a group without 'rank'")
                pj.check_rank(group["rank"], tuple(p.shape), what=f"rank (params[{i}])")
        super().add_param_group(group)

    # -- pickle, deepcopy, state_dict --------------------------------------------------------------------
    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend}  # torch's keeps defaults, state, groups only

    def __setstate__(self, state):  # also called by load_state_dict, with state and param_groups only
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)

    def load_state_dict(self, state_dict):
        # torch casts every floating state tensor to the parameter's dtype: that would round the fp32
        # moments of a bf16 parameter. Take our tensors out, let torch map the rest, put them back.
        state_dict = dict(state_dict)
        kept = {}
        state = {}
        for pid, s in state_dict["state"].items():
            s = dict(s)
            kept[pid] = {k: s.pop(k) for k in list(s) if isinstance(s[k], torch.Tensor)}
            state[pid] = s
        state_dict["state"] = state
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in kept:
                for k, v in kept[pid].items():
                    self.state[p][k] = v.to(device=p.device)
            st = _galore_state(p)
            if st is not None:
                s = self.state.get(p, {})
                st.load_basis(s.get("proj_p"), s.get("proj_q"), s.get("step", 0))

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for g in self.param_groups:
            for p in g["params"]:
                st = _galore_state(p)
                if st is not None:
                    st.discard()

    # -- step -------------------------------------------------------------------------------------------
    def _backend_for(self, p) -> str:
        reason = None if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else f"dtype {p.dtype} is not supported by the kernels"
        return resolve_backend(self.backend, p.device, triton_ok=reason, cublas_ok=reason)

    @staticmethod
    def _param_name(group, gi, i, p) -> str:
        names = group.get("param_names")  # torch >= 2.6: an optimizer built from named_parameters()
        name = repr(names[i]) if names is not None and i < len(names) else f"param_groups[{gi}]['params'][{i}]"
        return f"{name} (shape {tuple(p.shape)})"

    def _refresh_due(self, p, group) -> bool:
        state = self.state.get(p, {})
        return state.get("step", 0) % group["update_proj_gap"] == 0 or (state.get("proj_p") is None and state.get("proj_q") is None)

    def _check_before_step(self) -> None:
        """Everything that can fail, before anything changes: hyperparameters (a scheduler may have set lr to
        inf), and gradients that a refresh step would take an SVD of."""
        for gi, group in enumerate(self.param_groups):
            try:
                self._validate_hyper(group)
            except ValueError as exc:
                raise ValueError(f"param_groups[{gi}]: {exc}") from None
            for i, p in enumerate(group["params"]):
                st = _galore_state(p)
                if st is not None:
                    dense, what = st.G, f"layer {st.name!r} (gradient-free GaLore)"
                elif p.grad is not None and "rank" in group and _is_dtensor(p):
                    raise NotImplementedError(
                        f"GaLoreAdamW: {self._param_name(group, gi, i, p)} in a GaLore group ('rank') is a DTensor (FSDP2 "
                        "or tensor parallel): projecting a sharded gradient is not supported yet; use the gradient-free "
                        "mode (fastpeft.galore.enable + fastpeft.distributed.galore_data_parallel) or a group without 'rank'")
                elif p.grad is not None and not p.grad.is_sparse and "rank" in group and self._refresh_due(p, group):
                    dense, what = p.grad, self._param_name(group, gi, i, p)
                else:
                    continue
                if dense is not None and not pj.all_finite(dense):
                    raise FloatingPointError(f"GaLoreAdamW: {what}: non-finite gradient (inf/NaN) on a projector refresh "
                                             "step; no parameter or optimizer state was changed")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # data parallelism: R must be averaged before anything reads it
            for p in group["params"]:
                st = _galore_state(p)
                if st is not None:
                    st.wait_reduction()
        self._check_before_step()
        for group in self.param_groups:
            for p in group["params"]:
                st = _galore_state(p)
                if st is not None:
                    self._step_gradient_free(p, group, st)
                elif p.grad is None:
                    continue
                elif p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                elif "rank" in group:
                    self._step_galore(p, group)
                else:
                    self._step_adamw(p, group)
        return loss

    @staticmethod
    def _step_size(group, step):
        lr = group["lr"]
        if group["correct_bias"]:
            b1, b2 = group["betas"]
            lr = lr * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
        return lr

    def _init_moments(self, state, shape, device):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(shape, device=device, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(shape, device=device, dtype=torch.float32)

    def _step_adamw(self, p, group):
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        g = p.grad.float()
        if "exp_avg" not in state:  # zeros_like: a DTensor parameter (FSDP2) gets DTensor moments, sharded like it
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        state["step"] += 1
        p.add_(m / (v.sqrt() + group["eps"]), alpha=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    @staticmethod
    def _new_basis(g, rank, side, group, dtype, projector):
        if projector == "svd":
            return pj.svd_basis(g, rank, side, dtype=dtype)
        gen = torch.Generator(device=g.device)
        gen.manual_seed(int(torch.randint(0, 2**62, ())))
        return pj.randomized_basis_dense(g, rank, side, dtype=dtype, oversample=group["oversample"],
                                         power_iters=group["power_iters"], generator=gen)

    @staticmethod
    def _apply_moment_policy(state, policy, old, new):
        if "exp_avg" not in state or old[0] is None and old[1] is None:
            return
        if policy == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        elif policy == "rotate":
            pj.rotate_moments(state["exp_avg"], state["exp_avg_sq"], old, new)

    def _step_galore(self, p, group):
        if _is_dtensor(p):
            raise NotImplementedError(
                f"GaLoreAdamW: a parameter of shape {tuple(p.shape)} in a GaLore group ('rank') is a DTensor (FSDP2 or "
                "tensor parallel): projecting a sharded gradient is not supported yet; use the gradient-free mode "
                "(fastpeft.galore.enable + fastpeft.distributed.galore_data_parallel) or a group without 'rank'")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        # the side is derived, not stored: torch's load_state_dict mangles string state values
        side, rank = pj.projection_side(tuple(p.shape), group["proj_type"]), group["rank"]
        grad = p.grad
        old = (state.get("proj_p"), state.get("proj_q"))
        if state["step"] % group["update_proj_gap"] == 0 or (old[0] is None and old[1] is None):
            new = self._new_basis(grad, rank, side, group, p.dtype, group["projector"])
            self._apply_moment_policy(state, group["moments"], old, new)
            for key, t in zip(("proj_p", "proj_q"), new):
                if t is not None:
                    state[key] = t
        basis = (state.get("proj_p"), state.get("proj_q"))
        self._init_moments(state, pj.low_rank_shape(tuple(p.shape), rank, side), p.device)
        b1, b2 = group["betas"]
        backend = self._backend_for(p)
        if backend == "triton":
            n = self._project_adam_triton(grad, basis, state, b1, b2, group["eps"])
        else:
            r = pj.project(grad, *basis).float()
            n = self._adam(r, state, b1, b2, group["eps"], backend)
        state["step"] += 1
        alpha = self._step_size(group, state["step"]) * group["scale"]
        self._update_weight(p, n, basis, alpha, group["lr"] * group["weight_decay"], backend)

    def _step_gradient_free(self, p, group, st):
        if st.G is None and not st.has_R:
            return
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        if st.G is not None:  # an exact-SVD refresh step: G was accumulated for this step only
            new = pj.svd_basis(st.G, st.rank, st.side, dtype=p.dtype)
            if st.reducer is not None:  # G is the same on every rank; the first rank's basis makes them bitwise equal
                new = st.reducer.same_basis(new)
            st.set_basis(new)
            r = pj.project(st.G, *(None if t is None else t.float() for t in (st.P, st.Q)))
            st.G = None
        else:
            r = st.R
        basis = (st.P, st.Q)
        if st.refreshed:
            self._apply_moment_policy(state, st.moments, st.prev, basis)
            st.refreshed, st.prev = False, (None, None)
        self._init_moments(state, r.shape, p.device)
        b1, b2 = group["betas"]
        backend = self._backend_for(p)
        n = self._adam(r, state, b1, b2, group["eps"], backend)
        state["step"] += 1
        alpha = self._step_size(group, state["step"]) * st.scale
        self._update_weight(p, n, basis, alpha, group["lr"] * group["weight_decay"], backend)
        st.has_R = False
        st.refresh_due = state["step"] % st.update_proj_gap == 0
        for key, t in zip(("proj_p", "proj_q"), basis):
            if t is not None:
                state[key] = t

    @staticmethod
    def _adam_torch(r, state, b1, b2, eps):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(r, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(r, r, value=1.0 - b2)
        return m / (v.sqrt() + eps)

    @staticmethod
    def _project_adam_triton(grad, basis, state, b1, b2, eps):
        k = _triton()
        p_, q_ = basis
        m, v = state["exp_avg"], state["exp_avg_sq"]
        n = torch.empty_like(m)
        if p_ is not None and q_ is not None:
            t = torch.empty((p_.shape[1], grad.shape[1]), device=grad.device, dtype=torch.float32)
            k.galore_project(p_.t(), grad, t, k.EPI_STORE)
            k.galore_project(t, q_.t(), n, k.EPI_ADAM, m, v, b1, b2, eps)
        elif p_ is not None:
            k.galore_project(p_.t(), grad, n, k.EPI_ADAM, m, v, b1, b2, eps)
        else:
            k.galore_project(grad, q_.t(), n, k.EPI_ADAM, m, v, b1, b2, eps)
        return n

    def _adam(self, r, state, b1, b2, eps, backend):
        """The normalized low-rank step N from the projected gradient r (fp32): the Triton kernel ("triton",
        "cublas") or PyTorch."""
        if backend in ("triton", "cublas"):
            n = torch.empty_like(r)
            _triton().galore_adam(r.contiguous(), state["exp_avg"], state["exp_avg_sq"], n, b1, b2, eps)
            return n
        return self._adam_torch(r, state, b1, b2, eps)

    @staticmethod
    def _update_weight(w, n, basis, alpha, lr_wd, backend):
        """W <- (W - alpha·back(N))·(1 - lr·wd), in place, never forming an m×n update. A DTensor W sharded on
        dim 0 (FSDP2): its local rows get the same rows of the rank-r product a·b (rows of a only)."""
        p_, q_ = basis
        if p_ is not None and q_ is not None:
            a, b = p_, n @ q_.float()
        elif p_ is not None:
            a, b = p_, n
        else:
            a, b = n, q_
        if _is_dtensor(w):
            from ..distributed import local_rows

            w, row0 = local_rows(w)
            a = a[row0:row0 + w.shape[0]]
            if w.shape[0] == 0:
                return
        decay = 1.0 - lr_wd
        if backend == "triton":
            _triton().galore_update(w, a, b, alpha, decay)
            return
        # torch and cublas: addmm_ accumulates into W (beta=1) without an m×n temporary on CUDA
        w.addmm_(a.to(w.dtype), b.to(w.dtype), alpha=-alpha)
        if lr_wd > 0.0:
            w.mul_(decay)
