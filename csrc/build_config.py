"""Build settings of the fastpeft CUDA extension, shared by setup.py and the just-in-time build
(fastpeft/_ext.py). Standard library only: setup.py loads this file by path.

FASTPEFT_BUILD_CUDA   unset: build when a CUDA build of torch and nvcc are present; 0: never; 1: build and
                      fail on compile errors (a missing toolkit or a CPU torch still only warns).
FASTPEFT_CUDA_ARCHS   target architectures, default "80;90" (sm_80 and sm_90 machine code, plus PTX of the
                      highest so that newer GPUs can run it). Entries: 80, 8.0, sm_80, 90+PTX, separated by
                      ";", "," or spaces.
"""
from __future__ import annotations

import os
import re

ENV_BUILD = "FASTPEFT_BUILD_CUDA"
ENV_ARCHS = "FASTPEFT_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90"
MIN_ARCH = 80  # bf16 tensor cores and TF32 wmma

CSRC = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("bindings.cpp", "shrink.cu", "expand.cu", "dy_reduce.cu", "bwd_da.cu", "rank_update.cu", "decode.cu",
           "runtime.cu")
CUDA_SOURCES = tuple(s for s in SOURCES if s.endswith(".cu"))
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
CXX_FLAGS = ("-O3",)

_ENTRY = re.compile(r"^(?:sm_|compute_)?(\d)\.?(\d)([a-z]?)(\+ptx)?$", re.IGNORECASE)


def parse_archs(spec: str | None) -> list[tuple[str, bool]]:
    """[(arch, with_ptx)] from a FASTPEFT_CUDA_ARCHS value, e.g. "80;90" -> [("80", False), ("90", True)]."""
    text = DEFAULT_ARCHS if spec is None or not spec.strip() else spec
    out: list[tuple[str, bool]] = []
    for raw in re.split(r"[;,\s]+", text.strip()):
        m = _ENTRY.match(raw)
        if m is None:
            raise ValueError(f"{ENV_ARCHS}: expected entries like 80, 8.0, sm_90 or 90+PTX, got {raw!r} in {text!r}")
        arch = m.group(1) + m.group(2) + m.group(3).lower()
        if int(m.group(1) + m.group(2)) < MIN_ARCH:
            raise ValueError(f"{ENV_ARCHS}: the kernels need sm_{MIN_ARCH} or newer (bf16 and TF32 tensor cores), got {raw!r}")
        if arch not in [a for a, _ in out]:
            out.append((arch, bool(m.group(4))))
    if not any(ptx for _, ptx in out):  # PTX of the highest arch lets newer GPUs JIT-compile the kernels
        top = max(range(len(out)), key=lambda i: int(re.sub(r"\D", "", out[i][0])))
        out[top] = (out[top][0], True)
    return out


def nvcc_arch_flags(spec: str | None) -> list[str]:
    flags = []
    for arch, ptx in parse_archs(spec):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def archs_token(spec: str | None) -> str:
    """The target list as one C identifier (passed as a macro, stringified in bindings.cpp)."""
    parts = []
    for arch, ptx in parse_archs(spec):
        parts.append(f"sm_{arch}")
        if ptx:
            parts.append(f"compute_{arch}")
    return "__".join(parts)


def source_paths(root: str = CSRC) -> list[str]:
    return [os.path.join(root, s) for s in SOURCES]


def _mode(var: str, env) -> str:
    value = env.get(var, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "never"
    if value in ("1", "true", "yes", "on"):
        return "force"
    raise ValueError(f"{var}: expected 0, 1 or unset, got {env.get(var)!r}")


def build_mode(env=os.environ) -> str:
    """'auto', 'never' or 'force' from FASTPEFT_BUILD_CUDA."""
    return _mode(ENV_BUILD, env)


def find_nvcc(cuda_home: str | None) -> str | None:
    """nvcc under CUDA_HOME, else on PATH."""
    import shutil

    if cuda_home:
        cand = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(cand):
            return cand
    return shutil.which("nvcc")


# ---- the CPU extension fastpeft._C_cpu (csrc/cpu/: the dropout stream on the CPU) -------------------------
# FASTPEFT_BUILD_CPU  unset: setup.py builds it whenever torch imports (a compile error only warns); 0: never;
#                     1: a compile error fails the install.
ENV_BUILD_CPU = "FASTPEFT_BUILD_CPU"
CPU_DIR = os.path.join(CSRC, "cpu")
CPU_SOURCES = ("bindings_cpu.cpp", "dropout_cpu.cpp", "lora_cpu.cpp")  # in csrc/cpu/; the kernel file is torch-free
# No -march: the kernel picks AVX-512, AVX2 or the baseline at run time, so the binary runs on any x86-64.
# -ffp-contract=off: no multiply is ever fused with an add (the kernels match torch's rounding bit for bit).
CPU_CXX_FLAGS = ("/O2",) if os.name == "nt" else ("-O3", "-ffp-contract=off")


def cpu_source_paths(root: str = CPU_DIR) -> list[str]:
    return [os.path.join(root, s) for s in CPU_SOURCES]


def cpu_build_mode(env=os.environ) -> str:
    """'auto', 'never' or 'force' from FASTPEFT_BUILD_CPU."""
    return _mode(ENV_BUILD_CPU, env)
