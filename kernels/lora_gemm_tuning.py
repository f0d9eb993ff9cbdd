"""Which config the LoRA GEMM (kernels/lora_linear.py `lora_gemm`) launches with: measured on the GPU it runs on.

On CUDA tensors the launcher asks `tuned_gemm_config` (the mechanism shared with the IA3 and multi-LoRA GEMMs:
kernels/gemm_tuning.py `tuned_config`); its key is (dtype, path, rows bucketed to a power of two,
N, K, dropout on/off, Q's layout). The first call for a key times each candidate of the M bucket
(lora_linear_configs.GEMM_CANDIDATES: the static default, persistent and other tilings) through
fastpeft/autotune.py `choose`, on fresh tensors of the call's shapes, dtypes and layouts (never the caller's),
and keeps the fastest; later calls find it with one dict lookup (autotune.lookup). autotune decides when nothing
may be measured (FASTPEFT_AUTOTUNE=0, torch.compile tracing, CUDA graph capture, the tuning cap): the cached
decision or the static default ("default"). Under the interpreter and on the CPU: the interpreter's config.
The decisions are fastpeft.backend_report()["autotune"]'s entries with op "lora_gemm", each with the chosen
config's tiles as "detail" (`chosen_gemm_configs` lists them, for benchmarks).

Warp specialization (tl.range(..., warp_specialize=True), Triton >= 3.4) is not among the candidates. Compiled
for sm_90 with Triton 3.9 (tests/static_compile.py): on the persistent kernel's tile loop it is ignored (no
ttg.warp_specialize op, the same PTX), as for any persistent loop on Hopper in that version; on gemm_loop's K loop
it is ignored at 8 warps (the large tiles) and at 4 warps (the mid tile) the compiler aborts the process
("LLVM ERROR: unsupported load type for producer commit", NVGPUWarpSpecialization), which no try/except can guard
(a try-compile would need a subprocess). Hence no feature detection either: a candidate for Blackwell (sm_100,
where Triton does specialize persistent loops) would need its own static check first.
"""
from __future__ import annotations

import torch

from .. import autotune
from .common import _num_sms
from .gemm_tuning import chosen_configs, fresh_like, tunable, tuned_config  # tunable: tests replace it here
from .lora_linear_configs import gemm_candidates, gemm_config

OP = "lora_gemm"


def persistent_programs(device: torch.device, tiles: int) -> int:
    """The persistent kernel's grid: one program per SM (at most one per tile); under the interpreter 3, so that
    the tests' small shapes give each program several tiles."""
    if device.type == "cuda":
        return max(1, min(tiles, _num_sms(device.index if device.index is not None else torch.cuda.current_device())))
    return max(1, min(tiles, 3))


def _key(p_mat, q_t, dropout, path: str, q_kn: bool) -> tuple:
    M, K = p_mat.shape
    return (p_mat.dtype, path, f"m{autotune.m_bucket(M)}", f"n{q_t.shape[0]}", f"k{K}",
            "dropout" if dropout is not None else "nodropout", "q_kn" if q_kn else "q_nk")


def tuned_gemm_config(launch, p_mat, q_t, l_mat, rm_t, bias, lora_scale: float, dropout, path: str,
                      q_kn: bool) -> dict:
    """The config `lora_gemm` launches with (see the module docstring). launch(p, q_t, l, rm_t, bias, scale,
    dropout, tuned=(path, cfg)) runs the GEMM with a given config: the runners call it on fresh tensors."""
    device = p_mat.device
    M = p_mat.shape[0]
    if not tunable(device):
        return gemm_config(M, p_mat.dtype, path, dropout is not None)
    cands = gemm_candidates(M, p_mat.dtype, path, dropout is not None)
    drop = None if dropout is None else (autotune.TIMING_SEED, dropout[1])
    return tuned_config(OP, _key(p_mat, q_t, dropout, path, q_kn), device, cands,
                        lambda g: tuple(fresh_like(t, g) for t in (p_mat, q_t, l_mat, rm_t, bias)),
                        lambda t, cfg: launch(*t, lora_scale, drop, tuned=(path, cfg)))


def _describe(key: tuple, choice: str) -> dict:
    """The chosen config's tiles, for backend_report()["autotune"] (autotune.set_describer)."""
    dtype, path, mb, _, _, dropout = key[:6]
    return dict(gemm_candidates(int(mb[1:]), dtype, path, dropout == "dropout").get(choice, {}))


autotune.set_describer(OP, _describe)


def chosen_gemm_configs() -> list[dict]:
    """The GEMM configs decided in this process (for benchmarks): backend_report()["autotune"]'s decisions of op
    "lora_gemm": key, the chosen candidate's name ("backend"), per-candidate milliseconds, source, and its tiles
    ("detail", PERSISTENT among them)."""
    return chosen_configs(OP)


__all__ = ["OP", "tuned_gemm_config", "tunable", "persistent_programs", "chosen_gemm_configs"]
