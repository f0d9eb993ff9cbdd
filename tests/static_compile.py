"""Compile a Triton kernel ahead of time for an NVIDIA architecture on a machine without a GPU and report
what the compiler made: registers, stack bytes (spills), shared memory, tensor-core instructions.

Used by the tests of every kernel: each shipped configuration must compile, spill nothing and use tensor
cores wherever it has a tl.dot, except fp32 dots at "ieee" precision, which have none to use
(`expects_tensor_cores`). Tensor-core instructions are counted in the PTX, where Hopper's warpgroup MMA is
wgmma.mma_async (HGMMA in the SASS) and Ampere's mma.sync (HMMA): the same yes/no as disassembling the
cubin, without the second per case that nvdisasm costs.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def _nvidia_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_report(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3) -> dict:
    """signature: Triton type per runtime argument ('*bf16', 'i32', 'fp32', ...); constexprs: value per constexpr."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)

    def grab(key):
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else None

    ptx = kernel.asm["ptx"]
    # PTX instructions: hgmma counts wgmma.mma_async (HGMMA), hmma counts mma.sync (HMMA)
    hgmma, hmma = len(re.findall(r"\bwgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx))
    return {"regs": grab("REG"), "stack": grab("STACK"), "shared": kernel.metadata.shared,
            "hgmma": hgmma, "hmma": hmma, "tensor_core": hgmma + hmma > 0}


def expects_tensor_cores(name: str) -> bool:
    """Whether a static case's dots compile to tensor-core instructions. Every case's do except an fp32 case
    at "ieee" precision (named "...fp32ieee...": torch's default fp32 matmul precision 'highest', under which
    the launchers pass "ieee"): no tensor-core instruction takes fp32 operands at full precision on sm_80 or
    sm_90, so those dots run on FMA units and the case must show no HMMA/HGMMA at all."""
    return "ieee" not in name


def tensor_core_failure(name: str, rep: dict) -> str | None:
    """The tensor-core expectation of `expects_tensor_cores` checked against a report, or None when met."""
    if expects_tensor_cores(name) and not rep["tensor_core"]:
        return f"{name}: no tensor-core instructions"
    if not expects_tensor_cores(name) and rep["tensor_core"]:
        return f"{name}: tensor-core instructions in an ieee fp32 case (TF32 would round its operands)"
    return None


def triton_type(dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def compile_in_subprocesses(worker, jobs, max_workers: int | None = None) -> list:
    """map(worker, jobs) in fresh spawned processes with the interpreter off.

    Under the test session's TRITON_INTERPRET=1, @triton.jit yields interpreter functions that cannot be
    compiled ahead of time; spawned workers inherit the environment at start, so it is switched off around
    the pool. `worker` must be a module-level function (it is pickled by reference).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        workers = max_workers or min(4, os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(worker, jobs))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def static_failures(reports, has_dot=lambda name: True) -> list[str]:
    """The failures among (name, report, error) triples: a compile error, any stack (register spills), and, for
    the kernels with a dot (has_dot(name)), a missing tensor-core instruction (tensor_core_failure)."""
    failures = []
    for name, rep, err in reports:
        if err is not None:
            failures.append(f"{name}: compile error {err}")
        elif rep["stack"] != 0:
            failures.append(f"{name}: {rep['stack']} bytes of stack (register spills), {rep['regs']} registers")
        elif has_dot(name) and tensor_core_failure(name, rep):
            failures.append(tensor_core_failure(name, rep))
    return failures
