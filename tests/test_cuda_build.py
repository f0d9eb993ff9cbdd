"""The CUDA backend on a machine without a GPU: every source compiles (nvcc for sm_80 and sm_90, object
files, no link; bindings.cpp against the installed torch's headers), the kernels spill nothing and use
tensor cores, the dropout stream of csrc/common.cuh equals fastpeft.dropout bit for bit (run as a host
program), the plans of the dA pass and the dY reduction keep each workspace within 4 MiB and take the paths the GPU
tests are written for (a host program), the "cuda" backend's Python
composition is right with float64 stand-ins for the kernels, and the package, its custom ops' fake
implementations, the loader's errors, setup.py and `python -m fastpeft.info` all work without the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = (80, 90)
# What torch.utils.cpp_extension adds to every nvcc command line (no implicit half/bf16 conversions).
TORCH_NVCC_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr")

_spec = importlib.util.spec_from_file_location("_fastpeft_build_config_test", CSRC / "build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)

NVCC = cfg.find_nvcc(os.environ.get("CUDA_HOME"))
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")


def _nvidia_tool(name: str) -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy that ships with Triton."""
    if NVCC is not None:
        cand = Path(NVCC).resolve().parent / name
        if cand.exists():
            return str(cand)
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return shutil.which(name)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


_PHILOX_PROG = (
    '#include "common.cuh"\n#include <cstdio>\n#include <cstdlib>\n'
    "int main(int argc, char** argv) {\n"
    "  const uint32_t seed = strtoul(argv[1], 0, 10), thr = strtoul(argv[4], 0, 10);\n"
    "  const int rows = atoi(argv[2]), cols = atoi(argv[3]), row0 = atoi(argv[5]);\n"
    "  for (int r = row0; r < row0 + rows; ++r) {\n"
    "    for (int c = 0; c < cols; ++c) putchar('0' + fastpeft::dropout_keep(seed, r, c, thr));\n"
    "    putchar('\\n');\n  }\n  return 0;\n}\n"
)


# The plans of csrc/fastpeft_cuda.h (inline, plain C++) for lines "da M K R sms" (bwd_da_plan) and "dy M N R sms"
# (dy_reduce_plan) on stdin: one line of numbers each.
_PLAN_PROG = (
    '#include "fastpeft_cuda.h"\n#include <cstdio>\n'
    "int main() {\n  char op[3]; long long M, K, R; int sms;\n"
    "  while (std::scanf(\"%2s %lld %lld %lld %d\", op, &M, &K, &R, &sms) == 5) {\n"
    "    if (op[1] == 'a') {\n"
    "      const fastpeft::BwdDaPlan p = fastpeft::bwd_da_plan(M, K, R, sms);\n"
    "      std::printf(\"%lld %lld %lld %lld %lld\\n\", (long long)p.rt, (long long)p.bk, (long long)p.m_blocks,\n"
    "                  (long long)p.rows_per_block, (long long)p.ws_elems);\n"
    "      continue;\n    }\n"
    "    const fastpeft::DyReducePlan p = fastpeft::dy_reduce_plan(M, K, R, sms);\n"
    "    std::printf(\"%lld %lld %lld %lld\", (long long)p.rt, (long long)p.passes, (long long)p.ws_ds_elems,\n"
    "                (long long)p.ws_db_elems);\n"
    "    for (int i = 0; i < 2; ++i) {\n"
    "      const fastpeft::DyReducePass& q = p.pass[i < p.passes ? i : 0];\n"
    "      std::printf(\" %d %d %lld %lld %lld %lld\", int(q.ds), int(q.db), (long long)q.col_splits,\n"
    "                  (long long)q.chunks_per_split, (long long)q.row_blocks, (long long)q.rows_per_block);\n"
    "    }\n    std::printf(\"\\n\");\n  }\n  return 0;\n}\n"
)


def _bindings_cmd() -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    defines = ["-DTORCH_EXTENSION_NAME=_C", f"-DFASTPEFT_ARCHS={cfg.archs_token(None)}", "-DFASTPEFT_BUILD_KIND=test"]
    return [GXX, "-std=c++20", "-fsyntax-only", "-Wall", *defines, *includes, str(CSRC / "bindings.cpp")]


class _Job:
    def __init__(self, cmd, product=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.product = product
        self._result = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            out, err = self.proc.communicate()
            self._result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._result


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Start every compile of this file at once (they dominate its run time); tests wait on their own."""
    out = tmp_path_factory.mktemp("cuda_build")
    jobs = {}
    if NVCC is not None:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        for src in cfg.CUDA_SOURCES:
            obj = out / (src + ".o")
            cmd = [NVCC, "-c", *cfg.NVCC_FLAGS, *TORCH_NVCC_FLAGS, *gencode, f"-I{CSRC}", str(CSRC / src), "-o", str(obj)]
            jobs[src] = _Job(cmd, obj)
        prog = out / "philox_check.cu"
        prog.write_text(_PHILOX_PROG)
        exe = out / "philox_check"
        jobs["philox"] = _Job([NVCC, "-std=c++17", "-arch=sm_80", f"-I{CSRC}", str(prog), "-o", str(exe)], exe)
    if GXX is not None:
        jobs["bindings"] = _Job(_bindings_cmd())
        prog = out / "plan_check.cpp"
        prog.write_text(_PLAN_PROG)
        exe = out / "plan_check"
        jobs["plan"] = _Job([GXX, "-std=c++17", "-O1", f"-I{CSRC}", str(prog), "-o", str(exe)], exe)
    yield jobs
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


@pytest.fixture(scope="module")
def objects(builds):
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    return {src: (builds[src].result(), builds[src].product) for src in cfg.CUDA_SOURCES}


def test_source_list_is_complete():
    on_disk = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert on_disk == sorted(cfg.SOURCES), "csrc/build_config.py SOURCES must list every .cu/.cpp in csrc/"


@needs_nvcc
@pytest.mark.parametrize("src", cfg.CUDA_SOURCES)
def test_cuda_source_compiles(objects, src):
    proc, obj = objects[src]
    assert proc.returncode == 0, f"nvcc failed on {src}:\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    assert "warning" not in proc.stderr.lower(), f"nvcc warnings on {src}:\n{proc.stderr[-4000:]}"


def _functions(text: str, marker: str) -> list[tuple[str, str]]:
    """Split cuobjdump output into (function name, body) pieces."""
    parts = re.split(rf"{marker}\s*:?\s*(\S+)", text)
    return [(parts[i].rstrip(":"), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


@needs_nvcc
@pytest.mark.parametrize("src", [s for s in cfg.CUDA_SOURCES if s != "runtime.cu"])
def test_kernels_do_not_spill_and_use_tensor_cores(objects, src):
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (neither in the CUDA toolkit nor in Triton)")
    proc, obj = objects[src]
    assert proc.returncode == 0, proc.stderr[-2000:]
    elfs = _run([tool, "--list-elf", str(obj)]).stdout
    for arch in ARCHS:
        assert f"sm_{arch}" in elfs, f"{src}: no sm_{arch} code in the object:\n{elfs}"

    usage = _run([tool, "--dump-resource-usage", str(obj)], check=True).stdout
    funcs = _functions(usage, "Function")
    kernels = [(n, body) for n, body in funcs if "_kernel" in n]
    assert len(kernels) >= 2 * 3, f"{src}: expected every dtype's kernels for both archs, found {len(kernels)}"
    for name, body in funcs:
        stack = re.search(r"STACK:(\d+)", body)
        assert stack is not None and int(stack.group(1)) == 0, f"{src}: {name} uses stack (register spills): {body.strip()}"

    sass = _run([tool, "-sass", str(obj)], check=True).stdout
    for name, body in _functions(sass, "Function :"):
        if "_kernel" in name:  # every main kernel does its products on the tensor cores
            assert re.search(r"\bHMMA\b", body), f"{src}: {name} has no tensor-core (HMMA) instruction"


@needs_nvcc
def test_dropout_stream_matches_pytorch_bit_for_bit(builds):
    """csrc/common.cuh's Philox keep-mask, compiled as host code, against fastpeft.dropout."""
    from fastpeft.dropout import dropout_keep_mask, keep_threshold

    proc, exe = builds["philox"].result(), builds["philox"].product
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [(0, 3, 37, 0.1, 0), (12345, 5, 64, 0.5, 0), (2**31 - 1, 4, 19, 0.9, 0), (7, 6, 41, 0.25, 70000)]
    for seed, rows, cols, p, row0 in cases:
        thr = keep_threshold(p)
        out = _run([str(exe), str(seed), str(rows), str(cols), str(thr), str(row0)], check=True).stdout.split()
        got = torch.tensor([[ch == "1" for ch in line] for line in out])
        want = dropout_keep_mask(seed, row0 + rows, cols, p)[row0:]
        assert torch.equal(got, want), f"mask differs for seed={seed} p={p} rows {row0}..{row0 + rows}"
        assert 0 < int(got.sum()) < got.numel(), "a mask that keeps all or nothing cannot tell streams apart"


@pytest.mark.skipif(GXX is None, reason="g++ not found")
def test_bwd_da_plan_bounds_its_workspace(builds):
    """dA's fp32 partials stay within 4 MiB beside dA for any shape; the row ranges tile M exactly."""
    proc, exe = builds["plan"].result(), builds["plan"].product
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [(1, 8, 1, 132), (37, 203, 16, 132), (8192, 4096, 16, 132), (8192, 4096, 64, 132), (8192, 11008, 128, 132),
             (65536, 4096, 256, 132), (1 << 20, 64, 16, 108), (1000, 16400, 64, 132), (0, 64, 16, 132), (5, 1, 3, 1)]
    text = "".join(f"da {m} {k} {r} {sms}\n" for m, k, r, sms in cases)
    out = _run([str(exe)], input=text, check=True).stdout.split("\n")
    for (m, k, r, sms), line in zip(cases, out):
        rt, bk, m_blocks, rows, ws = map(int, line.split())
        assert (rt, bk) == ((16, 64) if r <= 16 else (64, 32)), line
        assert ws * 4 <= 4 << 20 and ws == (m_blocks * r * k if m_blocks > 1 else 0), f"M={m} K={k} r={r}: {line}"
        assert 1 <= m_blocks <= 65535 and rows % 32 == 0 and rows > 0, line
        assert m_blocks * rows >= m and (m_blocks - 1) * rows < max(m, 1), f"M={m}: row ranges {line}"
    # enough blocks to fill the GPU where the workspace allows a split
    rt, bk, m_blocks, rows, ws = map(int, out[2].split())
    assert m_blocks > 1 and (4096 // bk) * m_blocks >= 2 * 132


def _dy_plans(builds, cases):
    """dy_reduce_plan of each (M, N, r, sms), parsed: (rt, passes, ws_ds, ws_db, [pass dicts])."""
    proc, exe = builds["plan"].result(), builds["plan"].product
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _run([str(exe)], input="".join(f"dy {m} {n} {r} {sms}\n" for m, n, r, sms in cases), check=True).stdout
    plans = []
    for line in out.splitlines():
        v = list(map(int, line.split()))
        keys = ("ds", "db", "col_splits", "chunks_per_split", "row_blocks", "rows_per_block")
        passes = [dict(zip(keys, v[4 + 6 * i: 10 + 6 * i])) for i in range(v[1])]
        plans.append((v[0], v[1], v[2], v[3], passes))
    assert len(plans) == len(cases)
    return plans


@pytest.mark.skipif(GXX is None, reason="g++ not found")
def test_dy_reduce_plan_bounds_its_workspace(builds):
    """dS's and dB's fp32 partials stay within 4 MiB each (so each reduction within one output plus 4 MiB) for any
    shape; the passes' ranges tile dY exactly; one pass computes both, or a dS pass and a dB pass."""
    cases = [(m, n, r, sms) for m in (1, 17, 1000, 8192, 65536) for n in (1, 255, 257, 4096, 11008, 28672)
             for r in (1, 16, 17, 64, 128, 256) for sms in (108, 132)]
    cases += [(0, 64, 16, 132), (37, 0, 8, 132), (5, 3, 2, 1)]
    for (m, n, r, sms), (rt, passes, ws_ds, ws_db, ps) in zip(cases, _dy_plans(builds, cases)):
        what = f"M={m} N={n} r={r} sms={sms}: {passes} pass(es) {ps}, ws {ws_ds} + {ws_db}"
        assert rt == (16 if r <= 16 else 64), what
        assert [(p["ds"], p["db"]) for p in ps] == ([(1, 1)] if passes == 1 else [(1, 0), (0, 1)]), what
        chunks = max(-(-n // 256), 1)
        for p in ps:
            per, splits, rows, blocks = p["chunks_per_split"], p["col_splits"], p["rows_per_block"], p["row_blocks"]
            assert per >= 1 and splits * per >= chunks and (splits - 1) * per < chunks, what
            assert rows > 0 and rows % 16 == 0 and 1 <= blocks <= 65535, what
            assert blocks * rows >= m and (blocks - 1) * rows < max(m, 1), what
        ds_splits, db_blocks = ps[0]["col_splits"], ps[-1]["row_blocks"]
        assert ws_ds == (ds_splits * m * r if ds_splits > 1 else 0), what
        assert ws_db == (db_blocks * n * r if db_blocks > 1 else 0), what
        assert 4 * ws_ds <= 4 << 20 and 4 * ws_db <= 4 << 20, what
        if passes == 2:  # the dB pass reads every chunk once per row range; the dS pass writes dS directly
            assert ps[1]["col_splits"] == chunks and ps[1]["chunks_per_split"] == 1 and ds_splits == 1, what


@pytest.mark.skipif(GXX is None, reason="g++ not found")
def test_dy_reduce_plan_paths(builds):
    """The figures of fastpeft_cuda.h at M = 8192 on 132 SMs, and the GPU test's shapes (tests/cuda_reference.py
    DY_REDUCE_PATHS) take the path they are named for on 108 and 132 SMs."""
    from cuda_reference import DY_REDUCE_PATHS

    headline = [(8192, 4096, 16, 132), (8192, 4096, 128, 132), (8192, 11008, 16, 132), (8192, 11008, 128, 132)]
    got = [(passes, ws_ds, ws_db, [(p["col_splits"], p["row_blocks"]) for p in ps])
           for _, passes, ws_ds, ws_db, ps in _dy_plans(builds, headline)]
    assert got == [(1, 8 * 8192 * 16, 16 * 4096 * 16, [(8, 16)]),
                   (2, 0, 2 * 4096 * 128, [(1, 128), (16, 2)]),
                   (2, 0, 5 * 11008 * 16, [(1, 256), (43, 5)]),
                   (2, 0, 0, [(1, 128), (43, 1)])], got

    cases = [(*shape, sms) for shape, _ in DY_REDUCE_PATHS.values() for sms in (108, 132)]
    paths = [path for _, path in DY_REDUCE_PATHS.values() for _ in (108, 132)]
    for (m, n, r, sms), path, (_, passes, ws_ds, ws_db, ps) in zip(cases, paths, _dy_plans(builds, cases)):
        assert (passes, ws_ds > 0, ws_db > 0, ps[0]["chunks_per_split"]) == path, (m, n, r, sms, passes, ps)


@pytest.mark.skipif(GXX is None, reason="g++ not found")
def test_bindings_compile_against_installed_torch(builds):
    proc = builds["bindings"].result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = [line for line in proc.stderr.splitlines() if "bindings.cpp" in line and "warning" in line]
    assert not ours, "\n".join(ours)


def test_build_config_archs():
    assert cfg.parse_archs(None) == [("80", False), ("90", True)]
    assert cfg.parse_archs("8.0, sm_90") == [("80", False), ("90", True)]
    assert cfg.parse_archs("80+PTX;90") == [("80", True), ("90", False)]
    assert cfg.nvcc_arch_flags("90") == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    assert cfg.archs_token("80;90") == "sm_80__sm_90__compute_90"
    with pytest.raises(ValueError, match="FASTPEFT_CUDA_ARCHS.*'ampere'"):
        cfg.parse_archs("ampere")
    with pytest.raises(ValueError, match="sm_80 or newer.*75"):
        cfg.parse_archs("75;80")
    assert cfg.build_mode({}) == "auto"
    assert cfg.build_mode({"FASTPEFT_BUILD_CUDA": "0"}) == "never"
    assert cfg.build_mode({"FASTPEFT_BUILD_CUDA": "1"}) == "force"
    with pytest.raises(ValueError, match="FASTPEFT_BUILD_CUDA.*'maybe'"):
        cfg.build_mode({"FASTPEFT_BUILD_CUDA": "maybe"})


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the skip path of a CPU build of torch")
def test_setup_py_skips_the_extension_on_cpu_torch():
    env = {**os.environ, "FASTPEFT_BUILD_CUDA": "1"}
    proc = _run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "fastpeft"
    assert "WARNING: not building the CUDA extension" in proc.stderr and "CPU build" in proc.stderr


def test_custom_ops_trace_with_fake_tensors():
    """The fakes give torch.compile the right shapes and dtypes without the extension."""
    importlib.import_module("fastpeft.ops.cuda_ops")  # registers the torch.ops.fastpeft.cuda_* ops

    m = dict(device="meta", dtype=torch.bfloat16)
    x, a, b, w = torch.empty(37, 41, **m), torch.empty(5, 41, **m), torch.empty(23, 5, **m), torch.empty(23, 41, **m)
    s = torch.ops.fastpeft.cuda_lora_shrink(x, a, 0.1, 3)
    assert (s.shape, s.dtype) == ((37, 5), torch.bfloat16)
    ds, db = torch.ops.fastpeft.cuda_lora_dy_reduce(torch.empty(37, 23, **m), b, s, 2.0)
    assert (ds.shape, db.shape, ds.dtype, db.dtype) == ((37, 5), (23, 5), torch.float32, torch.float32)
    assert torch.ops.fastpeft.cuda_rank_update(w, b, a, 0.5) is None
    y, s7 = torch.ops.fastpeft.cuda_lora_decode(x[:7], w, torch.empty(23, **m), a, b, 2.0, 0.1, 3)
    assert (y.shape, y.dtype, s7.shape, s7.dtype) == ((7, 23), torch.bfloat16, (7, 5), torch.bfloat16)
    c = torch.ops.fastpeft.cuda_lora_expand(s, b.t(), torch.empty(23, **m), 2.0, 0.0, 0)
    assert (c.shape, c.dtype) == ((37, 23), torch.bfloat16)
    low = torch.ops.fastpeft.cuda_lora_expand(s, a, None, 1.25, 0.2, 3)
    assert (low.shape, low.dtype) == ((37, 41), torch.bfloat16)
    da = torch.ops.fastpeft.cuda_lora_bwd_da(x, s, 0.2, 3)
    assert (da.shape, da.dtype) == ((5, 41), torch.float32)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda m: torch.ops.fastpeft.cuda_lora_shrink(torch.empty(4, 8, **m), torch.empty(2, 9, **m), 0.0, 0), ValueError, "a: expected size 8 in dim 1"),
        (lambda m: torch.ops.fastpeft.cuda_lora_shrink(torch.empty(4, 8, **m), torch.empty(257, 8, **m), 0.0, 0), ValueError, r"rank in \[1, 256\], got 257"),
        (lambda m: torch.ops.fastpeft.cuda_lora_shrink(torch.empty(4, 8, **m), torch.empty(2, 8, **m), 1.0, 0), ValueError, "p: expected"),
        (lambda m: torch.ops.fastpeft.cuda_lora_shrink(torch.empty(4, 8, **m), torch.empty(2, 8, **m), 0.1, -1), ValueError, "seed: expected"),
        (lambda m: torch.ops.fastpeft.cuda_lora_shrink(torch.empty(4, 8, **m), torch.empty(2, 8, device="meta"), 0.0, 0), TypeError, "a: expected dtype torch.float16"),
        (lambda m: torch.ops.fastpeft.cuda_lora_dy_reduce(torch.empty(4, 8, **m), torch.empty(8, 2, **m), torch.empty(5, 2, **m), 1.0), ValueError, "s_mat: expected size 4 in dim 0"),
        (lambda m: torch.ops.fastpeft.cuda_rank_update(torch.empty(4, 8, **m), torch.empty(4, 2, **m), torch.empty(3, 8, **m), 1.0), ValueError, "a: expected size 2 in dim 0"),
        (lambda m: torch.ops.fastpeft.cuda_lora_decode(torch.empty(17, 8, **m), torch.empty(4, 8, **m), None, torch.empty(2, 8, **m), torch.empty(4, 2, **m), 1.0, 0.0, 0), ValueError, "at most 16 rows"),
        (lambda m: torch.ops.fastpeft.cuda_lora_decode(torch.empty(3, 8, **m), torch.empty(4, 8, **m), torch.empty(5, **m), torch.empty(2, 8, **m), torch.empty(4, 2, **m), 1.0, 0.0, 0), ValueError, r"bias: expected shape \[4\]"),
        (lambda m: torch.ops.fastpeft.cuda_lora_decode(torch.empty(3, 8, **m), torch.empty(4, 8, **m), None, torch.empty(2, 8, **m), torch.empty(4, 2, **m), 1.0, 0.1, 2**31), ValueError, "seed: expected"),
        (lambda m: torch.ops.fastpeft.cuda_lora_expand(torch.empty(4, 3, **m), torch.empty(2, 9, **m), None, 1.0, 0.0, 0), ValueError, "rm: expected size 3 in dim 0"),
        (lambda m: torch.ops.fastpeft.cuda_lora_expand(torch.empty(4, 3, **m), torch.empty(3, 9, **m), torch.empty(8, **m), 1.0, 0.0, 0), ValueError, r"bias: expected shape \[9\]"),
        (lambda m: torch.ops.fastpeft.cuda_lora_expand(torch.empty(4, 3, **m), torch.empty(3, 9, **m), None, 1.0, 1.0, 0), ValueError, "p: expected"),
        (lambda m: torch.ops.fastpeft.cuda_lora_expand(torch.empty(4, 3, **m), torch.empty(3, 9, device="meta"), None, 1.0, 0.0, 0), TypeError, "rm: expected dtype torch.float16"),
        (lambda m: torch.ops.fastpeft.cuda_lora_bwd_da(torch.empty(4, 8, **m), torch.empty(5, 2, **m), 0.1, 1), ValueError, "ds: expected size 4 in dim 0"),
        (lambda m: torch.ops.fastpeft.cuda_lora_bwd_da(torch.empty(4, 8, **m), torch.empty(4, 257, **m), 0.1, 1), ValueError, r"rank in \[1, 256\], got 257"),
    ],
)
def test_fake_implementations_reject_bad_shapes(call, err, match):
    importlib.import_module("fastpeft.ops.cuda_ops")  # registers the ops

    with pytest.raises(err, match=match):
        call(dict(device="meta", dtype=torch.float16))


def test_cpu_tensors_get_a_clear_error_before_any_build():
    from fastpeft.ops.cuda_ops import (
        lora_bwd_da_cuda, lora_decode_cuda, lora_dy_reduce_cuda, lora_expand_cuda, lora_shrink_cuda, rank_update_cuda_,
    )

    x, a, b, w = torch.randn(3, 8), torch.randn(2, 8), torch.randn(4, 2), torch.randn(4, 8)
    w0 = w.clone()
    with pytest.raises(ValueError, match="x: expected a CUDA tensor, got device cpu"):
        lora_shrink_cuda(x, a, 0.1, 1)
    with pytest.raises(ValueError, match="dy: expected a CUDA tensor"):
        lora_dy_reduce_cuda(torch.randn(3, 4), b, torch.randn(3, 2), 1.0)
    with pytest.raises(ValueError, match="w: expected a CUDA tensor"):
        rank_update_cuda_(w, b, a, 1.0)
    assert torch.equal(w, w0), "nothing may be written on an error path"
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        lora_decode_cuda(x, w, None, a, b, 1.0)
    with pytest.raises(ValueError, match="l_mat: expected a CUDA tensor"):
        lora_expand_cuda(torch.randn(3, 2), b.t(), None, 1.0)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        lora_bwd_da_cuda(x, torch.randn(3, 2), 0.1, 1)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error of a CPU build of torch")
def test_loading_the_extension_on_cpu_torch_names_the_cause():
    from fastpeft import BackendUnavailableError, _ext

    with pytest.raises(BackendUnavailableError, match="CPU build"):
        _ext.load_extension()
    assert "CPU build" in _ext.unavailable_reason()


def test_loader_reports_missing_toolkit_and_compile_errors(monkeypatch):
    """The loader's error paths, with the platform faked as CUDA-capable."""
    from fastpeft import _ext

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.setattr(_ext, "platform_reason", lambda: None)
    monkeypatch.setattr(_ext, "prebuilt_status", lambda: (None, "fastpeft._C was not built by setup.py"))
    monkeypatch.setattr(_ext, "jit_reason", lambda: "nvcc was not found (install the CUDA toolkit)")
    with pytest.raises(_ext.CudaExtensionError, match="not built by setup.py, and it cannot be built just in time: nvcc was not found"):
        _ext.load_extension()

    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.setattr(_ext, "jit_reason", lambda: None)
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("Error building extension 'fastpeft_C': shrink.cu(12): error: identifier undefined")

    monkeypatch.setattr(_ext, "_jit_build", failing_build)
    for _ in range(2):  # the failure is remembered, not rebuilt on every call
        with pytest.raises(_ext.CudaExtensionError, match="just-in-time build of the CUDA extension failed.*identifier undefined"):
            _ext.load_extension()
    assert calls == [1]
    assert "identifier undefined" in _ext.unavailable_reason()


def test_info_runs_and_names_every_backend():
    proc = _run([sys.executable, "-m", "fastpeft.info"], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for key in ("fastpeft ", "torch ", "extension fastpeft._C:", "  torch:", "  triton:", "  cuda:"):
        assert key in out, f"missing {key!r} in:\n{out}"
    if torch.version.cuda is None:
        assert "cuda:   cannot run: " in out and "CPU build" in out


@pytest.mark.parametrize("m, p, dtype, with_bias", [(5, 0.0, torch.float32, True), (16, 0.3, torch.bfloat16, False),
                                                     (37, 0.0, torch.bfloat16, False), (37, 0.3, torch.float32, True)])
def test_cuda_backend_composition_with_float64_stand_ins(monkeypatch, m, p, dtype, with_bias):
    """ops/lora_linear_cuda.py's plumbing (which op runs, transposes, scales, seed, bias, dtypes) on CPU tensors with
    the csrc ops replaced by their float64 references (tests/cuda_reference.py): forward and backward against the
    float64 LoRA reference, fp32 adapters, a column-strided x and a 0-d tensor seed read on the host."""
    from cuda_reference import fake_cuda_ops, shrink_ref
    from reference_lora import reference_with_grads
    from tolerances import assert_close

    from fastpeft.dropout import keep_threshold
    from fastpeft.ops import lora_linear_cuda as mod

    calls = []
    fake_cuda_ops(monkeypatch, mod, calls)
    g = torch.Generator().manual_seed(m)
    K, N, r, scaling, seed = 23, 19, 4, 1.5, 4321
    x = torch.randn(m, 2 * K, generator=g).to(dtype)[:, ::2]
    w = (torch.randn(N, K, generator=g) * 0.2).to(dtype)
    a, b = torch.randn(r, K, generator=g) * 0.3, torch.randn(N, r, generator=g) * 0.3
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    dy = torch.randn(m, N, generator=g).to(dtype)
    seed_arg = torch.tensor(seed) if p > 0 else seed
    y, s = mod.lora_linear_fwd_cuda(x, w, a, b, bias, scaling, p, seed_arg, keep_threshold(p))
    assert calls == (["decode"] if m <= 16 else ["shrink", "expand"])
    assert y.dtype == s.dtype == dtype and y.shape == (m, N) and s.shape == (m, r)
    y_ref, grads = reference_with_grads(x, w, a, b, bias, scaling, dy, p, seed)
    assert_close(y, y_ref, dtype, f"y M={m} p={p}", k=K)
    assert_close(s, shrink_ref(x, a.to(dtype), p, seed), dtype, f"S M={m} p={p}", k=K)

    calls.clear()
    dx, da, db, dbias = mod.lora_linear_bwd_cuda(dy, x, w, a, b, s, scaling, p, seed_arg, keep_threshold(p),
                                                 (True, True, True, with_bias))
    assert calls == ["dy_reduce", "expand"] + (["bwd_da"] if p > 0 else [])
    assert (dx.dtype, da.dtype, db.dtype) == (dtype, a.dtype, b.dtype)
    gx, _, ga, gb, gbias = grads
    assert_close(dx, gx, dtype, "dX", k=N)
    assert_close(da, ga, dtype, "dA", k=m)
    assert_close(db, gb, dtype, "dB", k=m)
    if with_bias:
        assert_close(dbias, gbias, dtype, "dbias", k=m)
    else:
        assert dbias is None

    calls.clear()
    only_dx = mod.lora_linear_bwd_cuda(dy, x, w, a, b, s, scaling, p, seed_arg, keep_threshold(p), (True, False, False, False))
    assert calls == ["dy_reduce", "expand"] and only_dx[1:] == (None, None, None)
    assert torch.equal(only_dx[0], dx)
    calls.clear()
    only_dbias = mod.lora_linear_bwd_cuda(dy, x, w, a, b, s, scaling, p, seed_arg, keep_threshold(p), (False, False, False, True))
    assert calls == [] and only_dbias[:3] == (None, None, None)
