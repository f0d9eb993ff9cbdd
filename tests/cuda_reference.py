"""Float64 references of the csrc ops (fastpeft/ops/cuda_ops.py), written from their documented contracts with the
dropout mask of fastpeft.dropout.dropout_keep_mask (the stream of every backend). tests/test_cuda_ops.py compares
the kernels with them on a GPU; tests/test_cuda_build.py runs the "cuda" backend's Python composition
(ops/lora_linear_cuda.py) on the CPU with them standing in for the kernels (`fake_cuda_ops`).
"""
import torch

from fastpeft.dropout import dropout_keep_mask

F64 = torch.float64

# Shapes (M, N, r) that take each path of csrc's dy_reduce_plan on 108 and 132 SMs (A100, H100/H200; checked on the
# host by tests/test_cuda_build.py, run against float64 on a GPU by tests/test_cuda_ops.py), with the path:
# (passes, dS through partials, dB through partials, 256-column chunks per column range of the pass computing dS).
DY_REDUCE_PATHS = {
    "one pass, both split, 2-chunk ranges": ((8200, 2600, 16), (1, True, True, 2)),
    "one pass, dS direct": ((8200, 200, 64), (1, False, True, 1)),
    "one pass, dB direct": ((40, 9000, 64), (1, True, False, 1)),
    "one pass, no workspace": ((16, 200, 16), (1, False, False, 1)),
    "two passes, dS direct over 11 chunks": ((8200, 2600, 64), (2, False, True, 11)),
    "two passes, no workspace, 4 rank slices": ((3000, 2600, 256), (2, False, False, 11)),
}


def _kept(t64, p, seed):
    """t64 * keep / (1 - p) with the mask of a tensor of t64's shape (rows, cols) drawn from seed."""
    if p == 0:
        return t64
    return t64 * dropout_keep_mask(seed, t64.shape[0], t64.shape[1], p, device=t64.device) / (1 - p)


def shrink_ref(x, a, p=0.0, seed=0):
    return _kept(x.to(F64), p, seed) @ a.to(F64).t()


def expand_ref(l_mat, rm, bias, scale, p=0.0, seed=0):
    out = scale * (l_mat.to(F64) @ rm.to(F64))
    if p > 0:
        out = out * dropout_keep_mask(seed, out.shape[0], out.shape[1], p, device=out.device)
    return out + bias.to(F64) if bias is not None else out


def dy_reduce_ref(dy, b, s_mat, scaling):
    dy64 = dy.to(F64)
    return scaling * dy64 @ b.to(F64), scaling * dy64.t() @ s_mat.to(F64)


def bwd_da_ref(x, ds, p=0.0, seed=0):
    return ds.to(F64).t() @ _kept(x.to(F64), p, seed)


def decode_ref(x, w, bias, a, b, scaling, p=0.0, seed=0):
    """(y, S): S rounded to x's dtype before it enters y, as the kernel (and every other path) does."""
    s = shrink_ref(x, a, p, seed)
    y = x.to(F64) @ w.to(F64).t() + scaling * s.to(x.dtype).to(F64) @ b.to(F64).t()
    return (y + bias.to(F64) if bias is not None else y), s


def fake_cuda_ops(monkeypatch, module, calls: list):
    """Replace the csrc ops that `module` (ops/lora_linear_cuda.py) imported by these references, rounded to each
    op's output dtype, recording the op names in `calls`: the composition runs on CPU tensors."""

    def shrink(x, a, p=0.0, seed=0):
        calls.append("shrink")
        assert isinstance(seed, int) and a.dtype == x.dtype
        return shrink_ref(x, a, p, seed).to(x.dtype)

    def expand(l_mat, rm, bias, scale, p=0.0, seed=0):
        calls.append("expand")
        assert isinstance(seed, int) and rm.dtype == l_mat.dtype and (bias is None or bias.dtype == l_mat.dtype)
        return expand_ref(l_mat, rm, bias, scale, p, seed).to(l_mat.dtype)

    def dy_reduce(dy, b, s_mat, scaling):
        calls.append("dy_reduce")
        assert b.dtype == s_mat.dtype == dy.dtype
        return tuple(t.to(torch.float32) for t in dy_reduce_ref(dy, b, s_mat, scaling))

    def bwd_da(x, ds, p=0.0, seed=0):
        calls.append("bwd_da")
        assert isinstance(seed, int) and ds.dtype == x.dtype
        return bwd_da_ref(x, ds, p, seed).to(torch.float32)

    def decode(x, w, bias, a, b, scaling, p=0.0, seed=0):
        calls.append("decode")
        assert isinstance(seed, int) and x.shape[0] <= module.MAX_DECODE_ROWS
        assert w.dtype == a.dtype == b.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
        y, s = decode_ref(x, w, bias, a, b, scaling, p, seed)
        return y.to(x.dtype), s.to(x.dtype)

    for name, fn in [("lora_shrink_cuda", shrink), ("lora_expand_cuda", expand), ("lora_dy_reduce_cuda", dy_reduce),
                     ("lora_bwd_da_cuda", bwd_da), ("lora_decode_cuda", decode)]:
        monkeypatch.setattr(module, name, fn)
