"""`python -m fastpeft.info`: what is installed and built, and which backends can run here."""
from __future__ import annotations

import platform
import subprocess
import sys


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as exc:  # a broken toolkit must not break the report
        return f"{nvcc} (version unknown: {exc})"
    release = [line for line in out.splitlines() if "release" in line]
    return f"{nvcc} ({release[-1].strip() if release else 'version unknown'})"


def _cpu_extension_line(_ext_cpu) -> str:
    """How the PyTorch backend's CPU dropout runs: setup.py's build, a just-in-time build, or the twin. Never
    builds anything (a report must stay quick)."""
    mod, why = _ext_cpu.prebuilt_status()
    if _ext_cpu.disabled():
        state = f"not used: {_ext_cpu.ENV_KERNELS}=0 (the CPU dropout runs the PyTorch twin)"
        return (f"built by setup.py; {state}" if mod is not None else state)
    if mod is not None:
        return (f"built by setup.py; the CPU dropout kernels run with {mod.isa()} "
                f"(this CPU and build: {mod.available_isas()})")
    jit = _ext_cpu.jit_reason()
    if jit is None:
        return f"not built ({why}); just-in-time build on first use: possible"
    return (f"not built ({why}); just-in-time build on first use: not possible ({jit}); the CPU dropout runs the "
            "PyTorch twin (same results, slower)")


def report() -> str:
    import torch

    import fastpeft
    from fastpeft import _backend, _ext, _ext_cpu

    lines = [f"fastpeft {fastpeft.__version__}", f"python {platform.python_version()} ({sys.executable})"]
    lines.append(f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: does not import ({type(exc).__name__}: {exc})")

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"[{i}] {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    lines.append("CUDA devices: " + (", ".join(gpus) if gpus else "none"))

    cfg = _ext._build_config()
    from torch.utils import cpp_extension

    nvcc = cfg.find_nvcc(cpp_extension.CUDA_HOME) if cfg is not None else None
    lines.append("nvcc: " + (_nvcc_version(nvcc) if nvcc else "not found"))

    mod, why = _ext.prebuilt_status()
    if mod is not None:
        archs = getattr(mod, "archs", "unknown").replace("__", ", ")
        text = f"built by setup.py for {archs}"
        if torch.cuda.is_available():
            try:
                binary, ptx = mod.loaded_arch(torch.cuda.current_device())
                text += f"; on device {torch.cuda.current_device()} the driver runs code for sm_{binary} (from PTX {ptx})"
            except Exception as exc:  # e.g. no code for this GPU's architecture
                text += f"; does not run on device {torch.cuda.current_device()}: {exc}"
        lines.append("extension fastpeft._C: " + text)
    else:
        jit = _ext.jit_reason()
        lines.append(f"extension fastpeft._C: not built ({why}); just-in-time build on first use: "
                     + ("possible" if jit is None else f"not possible ({jit})"))

    lines.append("extension fastpeft._C_cpu: " + _cpu_extension_line(_ext_cpu))

    lines.append("backends:")
    lines.append("  torch:  runs here")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tr = _backend.triton_unavailable_reason(dev)
    lines.append(f"  triton: {'runs here on ' + dev.type if tr is None else 'cannot run: ' + tr}")
    cr = _ext.unavailable_reason()
    lines.append(f"  cuda:   {'runs here' if cr is None else 'cannot run: ' + cr}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
