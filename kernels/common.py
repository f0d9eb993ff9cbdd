"""Pieces shared by the Triton kernels' launchers and kernels: interpreter and precision helpers, path
choice, config helpers, grid splits, and the grouped tile order of the GEMMs. Every kernel module imports
this one, so a Triton too old for the kernels fails here, on import, with the reason."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._env import interpreter_enabled
from . import require_triton

require_triton()


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles share each column tile of the
    right operand while it is in L2."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


def interpreting() -> bool:
    """Kernels run under Triton's interpreter (TRITON_INTERPRET=1): launchers pick its small test configs."""
    return interpreter_enabled()


def rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def tiles_for(cfg: dict, dtype: torch.dtype, precision: str | None = None) -> dict:
    """A config-table entry resolved for operands of `dtype` whose dots run at `precision` (default:
    `dot_precision(dtype)`, what the launchers pass to tl.dot).

    16-bit: the entry as listed. fp32: the entry's "fp32" tiles, else the streamed dimension halved, so the
    pipeline stages of 4-byte tiles fit shared memory and registers (the compiler's register use is not
    monotone in it, hence the explicit entries). fp32 with "ieee" dots (torch's default precision 'highest':
    FMA instructions, no tensor cores): an FMA dot holds each thread's rows and columns of both operands over
    the whole reduction tile in registers, so GEMM entries take the fp32 minimum reduction tile of tl.dot (8,
    main loop and rank chunk) and at most 128 columns, and every entry then its own "ieee" tiles if listed.
    """
    cfg = dict(cfg)
    fp32, ieee = cfg.pop("fp32", None), cfg.pop("ieee", None)
    if dtype != torch.float32:
        return cfg
    if fp32 is not None:
        cfg.update(fp32)
    else:
        for key in ("BLOCK_K", "BLOCK_N") if "GROUP_M" not in cfg else ("BLOCK_K",):
            if key in cfg and cfg[key] > 32:
                cfg[key] //= 2
    if fma_dots(dtype, precision):
        if "GROUP_M" in cfg:
            cfg.update(BLOCK_K=8, BLOCK_N=min(cfg["BLOCK_N"], 128))
            if "RANK_CHUNK" in cfg:
                cfg["RANK_CHUNK"] = 8
        cfg.update(ieee or {})
    return cfg


def fma_dots(dtype: torch.dtype, precision: str | None = None) -> bool:
    """Dots of `dtype` operands at `precision` (default `dot_precision(dtype)`) run on FMA units, not tensor
    cores: fp32 at "ieee". They need their own, smaller reduction tiles (`tiles_for`)."""
    return dtype == torch.float32 and (precision or dot_precision(dtype)) == "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 follows torch's matmul precision setting
    ('highest', torch's default, means no TF32, as in torch.mm: "ieee"); 16-bit operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _tma_rows(t: torch.Tensor) -> bool:
    """A 2-D tensor a tensor descriptor can address: unit column stride, 16-byte aligned base and rows, and
    rows that do not overlap (a descriptor's row stride must be positive and cover the row: expanded rows,
    stride 0, and as_strided windows go through pointers)."""
    return (t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1) and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _allocate_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device=_scratch_device)


_scratch_device = "cpu"
_allocator_set = False


def path_for(device: torch.device, *row_major: torch.Tensor) -> str:
    """'tma' on sm_9x/sm_10x (and under the interpreter) when every tensor is descriptor-addressable, else 'ptr'."""
    global _allocator_set, _scratch_device
    if device.type == "cuda":
        # Hopper (9.x) and datacenter Blackwell (10.x): the large descriptor tiles need ~150 KB of shared
        # memory, which Ampere lacks TMA for and consumer Blackwell (12.x, ~99 KB a block) cannot hold
        if _capability(device.index if device.index is not None else torch.cuda.current_device())[0] not in (9, 10):
            return "ptr"
    elif not interpreting():
        return "ptr"
    if not all(_tma_rows(t) for t in row_major):
        return "ptr"
    if not _allocator_set:  # device-side descriptors need a little global scratch memory per launch
        _scratch_device = "cuda" if device.type == "cuda" else "cpu"
        triton.set_allocator(_allocate_scratch)
        _allocator_set = True
    return "tma"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    # enough programs to fill every SM twice; under the interpreter a few, so splits get exercised
    return 2 * _num_sms(device.index or 0) if device.type == "cuda" else 4


# Bytes of fp32 per-program partials a launcher may allocate for one reduction beyond the size of the reduced
# output itself (issue 13: bounded temporaries). A reduction runs on a fixed number of programs along the
# reduced dimension (`reduction_programs`), each looping over its share and writing one partial.
PARTIAL_BUDGET = 4 << 20


def reduction_programs(device: torch.device, blocks: int, other_programs: int, part_bytes: int) -> int:
    """How many programs share a reduction over `blocks` blocks, each writing one fp32 partial of `part_bytes`
    (the size of the reduced output): enough that, with `other_programs` along the other grid dimensions, the
    grid reaches target_programs(device); at most `blocks`; and at most 1 + PARTIAL_BUDGET // part_bytes, so the
    partials take at most one output plus PARTIAL_BUDGET bytes whatever the reduced length. A function of the
    shapes and the device only: the summation order, hence the result, is reproducible."""
    want = -(-target_programs(device) // max(other_programs, 1))
    cap = 1 + PARTIAL_BUDGET // max(part_bytes, 1)
    return max(1, min(blocks, want, cap))


def split_even(total_blocks: int, programs: int) -> tuple[int, int]:
    """`total_blocks` in contiguous chunks for at most `programs` programs: (blocks_per_chunk, chunks)."""
    per = -(-max(total_blocks, 1) // max(1, min(programs, total_blocks)))
    return per, -(-max(total_blocks, 1) // per)


def launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def tile_args(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith(("BLOCK_", "GROUP_"))}
