"""Adapter ids of the multi-adapter LoRA op: accepted dtypes and shapes, the per-sequence rule, the value check."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

KERNEL_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)  # read as they are
# uint16/32/64 have almost no torch ops (no comparisons on the CPU): converted to int64 (a [M] copy), where
# uint64 ids past 2**63 wrap to negative numbers, which are invalid ids as well
WIDE_UNSIGNED_ID_DTYPES = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
ID_DTYPES = KERNEL_ID_DTYPES + WIDE_UNSIGNED_ID_DTYPES
BASE_ONLY = -1


def _position(flat_index: int, shape) -> str:
    if len(shape) <= 1:
        return f"position {flat_index}"
    return f"position {tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))}"


def check_id_values(ids: torch.Tensor, n_adapters: int, loaded) -> None:
    """Raise on an id outside [-1, n_adapters) (or of an empty slot, when `loaded`, per slot bools or a bool
    tensor, is given), naming the first one and its position in `ids`. Reads the ids on the host: one device
    sync for CUDA ids."""
    flat = ids.reshape(-1)
    # int64 holds every id exactly but uint64 ones past 2**63, which wrap negative: invalid for unsigned ids
    wide = flat.long()
    lo = -1 if ids.dtype.is_signed else 0
    bad = (wide < lo) | (wide >= n_adapters)
    if bool(bad.any()):
        i = int(bad.int().argmax())
        base = "-1 = base only" if lo == -1 else f"{ids.dtype} cannot hold -1 (base only): use a signed dtype for it"
        raise ValueError(f"adapter_ids: expected ids in [{lo}, {n_adapters}) ({base}), got {flat[i].item()} "
                         f"at {_position(i, ids.shape)}")
    if isinstance(loaded, torch.Tensor):
        loaded = loaded.tolist()
    if loaded is not None and not all(loaded):
        empty = torch.tensor([not v for v in loaded] + [False], device=flat.device)
        hit = empty[torch.where(wide >= 0, wide, n_adapters)]
        if bool(hit.any()):
            i = int(hit.int().argmax())
            raise ValueError(f"adapter_ids: id {flat[i].item()} at {_position(i, ids.shape)} refers to an empty "
                             f"adapter slot (load an adapter into it first, or use -1 for base only)")


def prepare_ids(adapter_ids, x: torch.Tensor, n_adapters: int, check: bool = True,
                loaded: Sequence[bool] | torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """adapter_ids per token or per sequence -> ([M] ids on x's device, grouped).

    Shapes: x.shape[:-1] or [M] (M = x.numel() // in_features) is one id per token; for x of 3 or more
    dims, [x.shape[0]] is one id per sequence. The two readings coincide only when every sequence is one
    token long (then each id is both its sequence's and its token's), so the rule is unambiguous.
    Dtypes: any integer dtype (int8/16/32/64 and uint8 go to the kernels as they are, at any stride;
    uint16/32/64 are converted to int64); -1 (base only) needs a signed dtype.
    check: raise on ids outside [-1, n_adapters) (and on ids of empty slots when `loaded`, one bool per slot
    as a sequence or a tensor, is given; traced, a tensor keeps the slots' state out of the guards), naming
    the first bad value and its position; on CUDA ids that costs one device sync, skipped while a CUDA
    graph is being captured. Unchecked, every invalid id of every dtype means base only."""
    if isinstance(adapter_ids, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in adapter_ids):
            raise TypeError(f"adapter_ids: expected ints, got {adapter_ids!r}")
        adapter_ids = torch.tensor(adapter_ids, dtype=torch.int64)
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected a tensor of ints, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in ID_DTYPES:
        raise TypeError(f"adapter_ids: expected an integer dtype ({', '.join(str(d)[6:] for d in ID_DTYPES)}), "
                        f"got {adapter_ids.dtype}")
    if adapter_ids.device != x.device and adapter_ids.device.type != "cpu":
        raise ValueError(f"adapter_ids: expected device {x.device} (the device of x) or cpu, got {adapter_ids.device}")
    lead = tuple(x.shape[:-1])
    M = 1
    for d in lead:
        M *= d
    per_seq = x.dim() >= 3 and adapter_ids.dim() == 1 and adapter_ids.shape[0] == lead[0] and lead[0] != M
    if not per_seq and not (tuple(adapter_ids.shape) == lead or (adapter_ids.dim() == 1 and adapter_ids.numel() == M)):
        expect = f"[{M}] or {list(lead)} (one per token)"
        if x.dim() >= 3:
            expect += f" or [{lead[0]}] (one per sequence)"
        raise ValueError(f"adapter_ids: expected shape {expect}, got {tuple(adapter_ids.shape)}")
    check = check and adapter_ids.numel() > 0 and not adapter_ids.is_meta
    if check and torch.compiler.is_compiling():
        # traced: the check reads the ids on the host, so it runs inside an op (a copy of the ids to x's device)
        if loaded is not None and not isinstance(loaded, torch.Tensor):
            loaded = torch.tensor([bool(v) for v in loaded])
        ids = torch.ops.fastpeft.multi_lora_check_ids(adapter_ids, n_adapters, loaded, x.device)
    else:
        if check and not (adapter_ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            check_id_values(adapter_ids, n_adapters, loaded)
        ids = adapter_ids if adapter_ids.dtype in KERNEL_ID_DTYPES else adapter_ids.long()
        ids = ids.to(x.device, non_blocking=True)
    if per_seq:
        # one sequence: a stride-0 view (the kernels take any id stride); several: a copy of M ids
        seq = M // lead[0]
        return ids[:, None].expand(lead[0], seq).reshape(M), seq >= 64
    return ids.reshape(M), False
