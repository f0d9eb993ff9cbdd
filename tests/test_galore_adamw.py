"""GaLoreAdamW against a float64 GaLore written from the paper (tests/reference_galore.py), the Triton
kernels of the step against float64 products, galore-torch parity where it is installed, bad input."""
import io

import pytest
import torch

from fastpeft.optim import GaLoreAdamW
from reference_galore import ReferenceGaLoreAdam, decaying_matrix, galore_torch_with_fastpeft_signs
from tolerances import assert_close

BACKENDS = ["torch", "triton"]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
ON_CPU = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# "full" projects a refresh step's G onto its own singular vectors: R = Pᵀ·G·Qᵀ is diagonal in exact arithmetic,
# and Adam's R/(sqrt(R²)+eps) turns the rounding noise of the zero elements (~u·|G|, about eps = 1e-6) into
# O(1) updates in any implementation. An eps far above that noise keeps the comparison a rounding check.
FULL_EPS = 1e-3


def _run(shape, proj_type, backend, moments="keep", steps=7, gap=3, wd=0.1, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen).to(DEV, dtype))
    b = torch.nn.Parameter(torch.randn(shape[0], generator=gen).to(DEV, dtype))
    eps = FULL_EPS if proj_type == "full" else 1e-6
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 5, "update_proj_gap": gap, "scale": 0.5, "proj_type": proj_type}],
                      lr=0.01, eps=eps, weight_decay=wd, moments=moments, backend=backend)
    ref = ReferenceGaLoreAdam(w, rank=5, gap=gap, scale=0.5, proj_type=proj_type, lr=0.01, eps=eps, weight_decay=wd,
                              moments=moments)
    refb = ReferenceGaLoreAdam(b, lr=0.01, eps=eps, weight_decay=wd)
    for t in range(steps):
        g = decaying_matrix(*shape, gen)
        gb = torch.randn(shape[0], generator=gen)
        w.grad, b.grad = g.to(DEV, dtype), gb.to(DEV, dtype)
        opt.step()
        assert_close(w, ref.step(g.to(dtype)), torch.float32, f"W after step {t}")
        assert_close(b, refb.step(gb.to(dtype)), torch.float32, f"bias after step {t}")
    return opt, w


TRAJECTORY_CASES = [(s, p) for p in ("std", "reverse_std") for s in ((19, 30), (30, 19))] + [((19, 30), p) for p in ("left", "right", "full")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, proj_type", TRAJECTORY_CASES)
def test_trajectory_matches_reference(backend, shape, proj_type):
    # 5 steps with gap 2: refreshes at steps 0, 2, 4, the last two while moments exist; weight decay on;
    # a plain-AdamW bias in a group without rank
    _run(shape, proj_type, backend, steps=5, gap=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moments", ["reset", "rotate"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_moment_policies_match_reference(backend, moments, proj_type):
    _run((17, 26), proj_type, backend, moments=moments, steps=4, gap=2)


def test_rotate_is_sign_invariant():
    # rotating moments into a sign-flipped copy of the same basis must give the same update as keeping them
    from fastpeft.optim.projector import rotate_moments

    gen = torch.Generator().manual_seed(1)
    p = torch.linalg.qr(torch.randn(12, 4, generator=gen))[0]
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0])
    m, v = torch.randn(4, 9, generator=gen), torch.rand(4, 9, generator=gen)
    m2, v2 = m.clone(), v.clone()
    rotate_moments(m2, v2, (p, None), (p * flip, None))
    torch.testing.assert_close((p * flip) @ m2, p @ m)
    torch.testing.assert_close(v2, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_low_precision_step(backend, dtype, proj_type):
    if backend == "triton" and dtype == torch.bfloat16 and ON_CPU:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 kernels are tested on CUDA")
    gen = torch.Generator().manual_seed(2)
    shape = (21, 34)
    # W small and lr large enough that the update is not lost in W's rounding; eps of the order of R keeps
    # N = m / (sqrt(v) + eps) Lipschitz in R, so dtype rounding of R cannot flip a sign-like N entry
    w0 = (1e-3 * torch.randn(*shape, generator=gen)).to(dtype)
    w = torch.nn.Parameter(w0.clone().to(DEV))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "proj_type": proj_type}], lr=0.01, eps=0.3,
                      weight_decay=0.05, backend=backend)
    ref = ReferenceGaLoreAdam(w0, rank=4, gap=2, proj_type=proj_type, lr=0.01, eps=0.3, weight_decay=0.05)
    for t in range(3):
        g = decaying_matrix(*shape, gen, dtype=dtype)
        with torch.no_grad():  # a fresh small W each step: W's own rounding stays far below the update
            w.copy_((1e-3 * torch.randn(*shape, generator=gen)).to(DEV, dtype))
        before = w.detach().double().cpu()
        w.grad = g.to(DEV)
        opt.step()
        assert w.dtype == dtype and opt.state[w]["exp_avg"].dtype == torch.float32
        ref.w = before.clone()  # compare one step from the same rounded W: the update, not accumulated rounding
        expected = ref.step(g)
        assert_close(w.detach().double().cpu() - before, expected - before, dtype, f"update of step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_gradient_and_weight(backend):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(26, 15, generator=gen).to(DEV)
    w = torch.nn.Parameter(base.t())  # [15, 26] with transposed strides
    assert not w.is_contiguous()
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], lr=0.02, backend=backend)
    ref = ReferenceGaLoreAdam(w, rank=3, gap=2, lr=0.02)
    for t in range(3):
        g = decaying_matrix(26, 15, gen).t()
        w.grad = g.to(DEV)
        opt.step()
        assert_close(w, ref.step(g), torch.float32, f"step {t}")


def test_rank_equal_to_min_dim_and_single_row():
    for shape, pt in [((1, 23), "std"), ((9, 6), "reverse_std"), ((6, 9), "reverse_std")]:
        for backend in BACKENDS:
            gen = torch.Generator().manual_seed(4)
            w = torch.nn.Parameter(torch.randn(*shape, generator=gen).to(DEV))
            rank = min(shape)
            opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 2, "proj_type": pt}], lr=0.02, backend=backend)
            ref = ReferenceGaLoreAdam(w, rank=rank, gap=2, proj_type=pt, lr=0.02)
            for t in range(3):
                g = decaying_matrix(*shape, gen)
                w.grad = g.to(DEV)
                opt.step()
                assert_close(w, ref.step(g), torch.float32, f"{shape} {pt} {backend} step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend):
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float16
    mats = [torch.randn(14, 22, generator=gen).to(DEV, dtype), torch.randn(22, 14, generator=gen).to(DEV, dtype)]
    vec = torch.randn(14, generator=gen).to(DEV, dtype)
    grads = [[decaying_matrix(14, 22, gen, dtype=dtype), decaying_matrix(22, 14, gen, dtype=dtype), torch.randn(14, generator=gen).to(dtype)]
             for _ in range(8)]

    def make(tensors):
        ps = [torch.nn.Parameter(t.clone()) for t in tensors]
        opt = GaLoreAdamW([{"params": ps[2:]}, {"params": ps[:2], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "full"}],
                          lr=0.01, weight_decay=0.1, moments="rotate", backend=backend)
        return ps, opt

    def run(ps, opt, steps):
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.to(DEV)
            opt.step()

    ps_a, opt_a = make(mats + [vec])
    run(ps_a, opt_a, grads[:4])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    ps_b, opt_b = make([p.detach() for p in ps_a])
    opt_b.load_state_dict(loaded)
    for pa, pb in zip(ps_a, ps_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sb[k].dtype == sa[k].dtype and torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k
    run(ps_a, opt_a, grads[4:])
    run(ps_b, opt_b, grads[4:])
    for pa, pb in zip(ps_a, ps_b):
        assert torch.equal(pa, pb)


# -- galore-torch parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_torch_parity(proj_type, monkeypatch):
    mods = galore_torch_with_fastpeft_signs(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    for shape in [(18, 27), (27, 18)]:
        w0 = torch.randn(*shape, generator=gen)
        b0 = torch.randn(shape[0], generator=gen)
        groups = lambda ps: [{"params": [ps[1]]}, {"params": [ps[0]], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}]
        ours = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
        theirs = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
        opt_o = GaLoreAdamW(groups(ours), lr=0.01, weight_decay=0.1, backend="torch")
        opt_t = mods["adamw"].AdamW(groups(theirs), lr=0.01, weight_decay=0.1, no_deprecation_warning=True)
        for t in range(7):
            g, gb = decaying_matrix(*shape, gen), torch.randn(shape[0], generator=gen)
            for ps, opt in ((ours, opt_o), (theirs, opt_t)):
                ps[0].grad, ps[1].grad = g.clone(), gb.clone()
                opt.step()
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"{shape} step {t}: {m}")
            torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group, match", [
    ({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"rank": 11}, "min"), ({"rank": 2.0}, "int"),
    ({"rank": 2, "proj_type": "diagonal"}, "proj_type"), ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap"),
    ({"rank": 2, "scale": float("nan")}, "scale"), ({"rank": 2, "moments": "forget"}, "moments"),
    ({"rank": 2, "projector": "qr"}, "projector"), ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
    ({"eps": -1e-8}, "eps"), ({"weight_decay": -0.1}, "weight_decay"), ({"rank": 2, "power_iters": -1}, "power_iters"),
    ({"lr": float("inf")}, "lr"), ({"lr": float("nan")}, "lr"), ({"eps": float("inf")}, "eps"),
    ({"weight_decay": float("inf")}, "weight_decay"),
])
def test_bad_group(group, match):
    w = torch.nn.Parameter(torch.randn(10, 12))
    with pytest.raises((ValueError, TypeError), match=match):
        GaLoreAdamW([{"params": [w], **group}])


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -0.5])
def test_bad_lr_at_step_changes_nothing(lr):
    # a scheduler (or a user) may set lr after construction: step() refuses it before touching anything
    gen = torch.Generator().manual_seed(11)
    w, b = torch.nn.Parameter(torch.randn(10, 12, generator=gen)), torch.nn.Parameter(torch.randn(10, generator=gen))
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 2}], lr=0.01)
    w.grad, b.grad = torch.randn(10, 12, generator=gen), torch.randn(10, generator=gen)
    opt.step()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt.param_groups[1]["lr"] = lr
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr"):
        opt.step()
    assert torch.equal(w, w0) and torch.equal(b, b0)  # group 0 (stepped first) unchanged too
    assert all(opt.state[p]["step"] == 1 for p in (w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projector", ["svd", "randomized"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_on_refresh_step(backend, projector, bad):
    # refresh at steps 0 and 2; a bad gradient there names the parameter and changes no parameter or state
    gen = torch.Generator().manual_seed(12)
    named = [(f"layer{i}.weight", torch.nn.Parameter(torch.randn(9, 13, generator=gen).to(DEV))) for i in range(2)]
    opt = GaLoreAdamW([{"params": named, "rank": 3, "update_proj_gap": 2}], lr=0.01, projector=projector, backend=backend)
    ps = [p for _, p in named]
    for t in range(3):
        for p in ps:
            p.grad = torch.randn(9, 13, generator=gen).to(DEV)
        if t in (0, 2):
            ps[1].grad[4, 5] = bad
            before = [p.detach().clone() for p in ps]
            state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for p in ps}
            with pytest.raises(FloatingPointError, match=r"'layer1.weight' \(shape \(9, 13\)\): non-finite"):
                opt.step()
            for p, b in zip(ps, before):  # layer0, stepped before layer1, unchanged too
                assert torch.equal(p, b)
                assert opt.state[p].keys() == state[id(p)].keys()
                for k, v in state[id(p)].items():
                    assert torch.equal(opt.state[p][k], v) if isinstance(v, torch.Tensor) else opt.state[p][k] == v
            ps[1].grad[4, 5] = 0.0
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_step_allocates_nothing_weight_sized_between_refreshes(backend, proj_type):
    from alloc_recorder import AllocRecorder

    gen = torch.Generator().manual_seed(13)
    w = torch.nn.Parameter(torch.randn(24, 40, generator=gen).to(DEV))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 3, "proj_type": proj_type}], lr=0.01,
                      weight_decay=0.1, backend=backend)
    for t in range(3):
        w.grad = torch.randn(24, 40, generator=gen).to(DEV)
        with AllocRecorder() as rec:
            opt.step()
        if t == 0:  # the refresh's SVD forms [m, min(m, n)] factors: the recorder must see them
            assert rec.largest().numel >= 24 * 24
        else:
            rec.assert_below(24 * 40, f"step {t}")


def test_rank_on_non_matrix():
    for shape in [(12,), (3, 4, 5)]:
        with pytest.raises(ValueError, match="2-D"):
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(*shape))], "rank": 2}])


def test_error_leaves_optimizer_unchanged():
    ok = torch.nn.Parameter(torch.randn(8, 9))
    opt = GaLoreAdamW([{"params": [ok], "rank": 2}])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 9))], "rank": 99})
    assert len(opt.param_groups) == 1


# -- kernels ------------------------------------------------------------------------------------------------------
KDTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not ON_CPU else [])


@pytest.mark.parametrize("dtype", KDTYPES)
@pytest.mark.parametrize("mnk", [(5, 37, 53), (1, 17, 40), (33, 3, 19), (20, 20, 64)])
def test_project_kernel_epilogues(dtype, mnk):
    from fastpeft.kernels import galore as k

    M, N, K = mnk
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(K, M, generator=gen).to(DEV, dtype).t()  # a transposed view, like Pᵀ
    b = torch.randn(K, N, generator=gen).to(DEV, dtype)
    exp = a.double().cpu() @ b.double().cpu()
    out = torch.full((M, N), float("nan"), device=DEV)
    k.galore_project(a, b, out, k.EPI_STORE)
    assert_close(out, exp, dtype, "store")
    base = torch.randn(M, N, generator=gen).to(DEV)
    acc = base.clone()
    k.galore_project(a, b, acc, k.EPI_ACC)
    assert_close(acc, exp + base.double().cpu(), dtype, "accumulate")
    m0, v0 = torch.randn(M, N, generator=gen).to(DEV), torch.rand(M, N, generator=gen).to(DEV)
    m, v = m0.clone(), v0.clone()
    n = torch.full((M, N), float("nan"), device=DEV)
    k.galore_project(a, b, n, k.EPI_ADAM, m, v, 0.9, 0.99, 0.5)
    em = 0.9 * m0.double().cpu() + 0.1 * exp
    ev = 0.99 * v0.double().cpu() + 0.01 * exp * exp
    assert_close(m, em, dtype, "exp_avg")
    assert_close(v, ev, dtype, "exp_avg_sq")
    assert_close(n, em / (ev.sqrt() + 0.5), dtype, "normalised update")


@pytest.mark.parametrize("dtype", KDTYPES)
@pytest.mark.parametrize("mnk", [(37, 53, 5), (1, 29, 1), (40, 33, 20)])
def test_update_kernel(dtype, mnk):
    from fastpeft.kernels import galore as k

    M, N, K = mnk
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(N, M, generator=gen).to(DEV, dtype).t()  # non-contiguous weight
    a = torch.randn(M, K, generator=gen).to(DEV, dtype)
    b = torch.randn(K, N, generator=gen).to(DEV)  # fp32 N, as the optimizer passes it
    w = w0.clone(memory_format=torch.preserve_format)
    k.galore_update(w, a, b, 0.3, 0.97)
    exp = (w0.double().cpu() - 0.3 * a.double().cpu() @ b.to(dtype).double().cpu()) * 0.97
    assert_close(w, exp, dtype, "updated weight")


def test_adam_kernel():
    from fastpeft.kernels import galore as k

    gen = torch.Generator().manual_seed(9)
    r, m0, v0 = torch.randn(7, 41, generator=gen).to(DEV), torch.randn(7, 41, generator=gen).to(DEV), torch.rand(7, 41, generator=gen).to(DEV)
    m, v, n = m0.clone(), v0.clone(), torch.full_like(r, float("nan"))
    k.galore_adam(r, m, v, n, 0.8, 0.95, 1e-3)
    em, ev = 0.8 * m0.double() + 0.2 * r.double(), 0.95 * v0.double() + 0.05 * r.double() ** 2
    assert_close(m, em, torch.float32, "m")
    assert_close(v, ev, torch.float32, "v")
    assert_close(n, em / (ev.sqrt() + 1e-3), torch.float32, "n")


def _static_cases():
    from fastpeft.kernels import galore as k

    cases = []
    for cls, cfg in k.PROJECT_CONFIGS.items():
        for prec in (["ieee", "tf32"] if cls == "fp32" else ["ieee"]):
            cases.append(("project", cls, prec, cfg))
    for cls, cfg in k.UPDATE_CONFIGS.items():
        cases.append(("update", cls, "ieee", cfg))
    cases.append(("adam", "fp32", "ieee", k.ADAM_CONFIGS["fp32"]))
    return cases


def _compile(job):
    # runs in a fresh process without the interpreter: under TRITON_INTERPRET=1 kernels are not compilable
    import triton.language as tl

    from fastpeft.kernels import galore as k
    from static_compile import compile_report

    arch, (kind, cls, prec, cfg) = job
    dt, tdot = ("bf16", tl.bfloat16) if cls == "16bit" else ("fp32", tl.float32)
    i32 = "i32"
    if kind == "project":
        bm, bn, bk, warps, stages = cfg
        sig = {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "c_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "M": i32, "N": i32, "K": i32,
               "stride_am": i32, "stride_ak": i32, "stride_bk": i32, "stride_bn": i32, "beta1": "fp32", "beta2": "fp32", "eps": "fp32"}
        ce = {"EPILOGUE": k.EPI_ADAM, "DOT_DTYPE": tdot, "INPUT_PRECISION": prec, "EVEN_K": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        fn = k._galore_project_kernel
    elif kind == "update":
        bm, bn, bk, warps, stages = cfg
        sig = {"w_ptr": "*" + dt, "a_ptr": "*" + dt, "b_ptr": "*fp32", "M": i32, "N": i32, "K": i32, "stride_wm": i32, "stride_wn": i32,
               "stride_am": i32, "stride_ak": i32, "stride_bk": i32, "stride_bn": i32, "alpha": "fp32", "decay": "fp32"}
        ce = {"DOT_DTYPE": tdot, "INPUT_PRECISION": prec, "EVEN_K": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        fn = k._galore_update_kernel
    else:
        (block, warps), stages = cfg, 1
        sig = {"r_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "n_ptr": "*fp32", "numel": i32, "beta1": "fp32", "beta2": "fp32", "eps": "fp32"}
        ce = {"BLOCK": block}
        fn = k._galore_adam_kernel
    return compile_report(fn, sig, ce, arch=arch, num_warps=warps, num_stages=stages)


# fp32 tiles compile for sm_90 only, to keep the compile time of the test modest
STATIC_JOBS = [(arch, case) for case in _static_cases() for arch in (90, 80) if case[1] != "fp32" or arch == 90]


@pytest.fixture(scope="module")
def static_reports():
    from static_compile import compile_in_subprocesses

    try:
        return compile_in_subprocesses(_compile, STATIC_JOBS)
    except FileNotFoundError as exc:
        pytest.skip(f"NVIDIA binary tools missing: {exc}")


@pytest.mark.parametrize("index", range(len(STATIC_JOBS)), ids=[f"{c[0]}-{c[1]}-{c[2]}-sm{a}" for a, c in STATIC_JOBS])
def test_static_compile(static_reports, index):
    arch, (kind, cls, prec, cfg) = STATIC_JOBS[index]
    rep = static_reports[index]
    assert rep["stack"] == 0, rep
    if kind != "adam" and (cls == "16bit" or prec == "tf32"):
        assert rep["tensor_core"], rep
