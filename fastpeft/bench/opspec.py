"""What a benchmarked op is, and the defaults an op module does not restate.

An op is a module of fastpeft.bench (lora, adapter, ia3, galore, multi_lora) that defines
  NAME, IMPLS, DESCRIPTIONS            CLI name; implementation families ("fastpeft" stands for fastpeft[<backend>]);
                                       a line per implementation
  headline(preset), cases(preset)      the preset's headline case (which --case overrides vary around) and cases
  make_inputs(case, device, seed)      fresh random tensors shared by every implementation
  build(name, inputs, BuildOptions)    -> common.Impl, or raises common.Unavailable(reason)
  reference(inputs, kind)              float64 results keyed like Impl.run()'s
  work(case)                           metric -> (necessary FLOPs, necessary bytes)
  bytes_needed(case)                   a generous estimate of the case's peak memory
and, only where it differs from the default here:
  METRICS = ("fwd", "bwd", "fwd_bwd", "infer")   the metrics, in report order
  FLOOR = None                         the implementation the ratios are relative to
  HAS_CUDA_KERNELS = False             whether fastpeft[cuda] exists
  HAS_CUBLAS = False                   whether fastpeft[cublas] exists (cuBLAS GEMMs + Triton skinny kernels)
  HAS_AUTO = False                     whether fastpeft[auto] is its own figure: the op measures its backends on
                                       the device (backend="auto", fastpeft/autotune.py); elsewhere auto is the
                                       static default, already timed under that backend's name
  families(case) -> IMPLS              the families that apply to a case
  main_metric(case) -> "fwd_bwd"       the metric that headlines a case
  needs_twin(case) -> False            results are random (dropout): check an exact twin instead
  accumulation(case) -> the largest dimension of the case: the K its tolerances are derived from
  tiny(case) -> None                   the case at tiny sizes, where a call's time is its host overhead (the
                                       "host µs" columns); None: no such column
The harness reads an op through OpSpec, which adds these defaults and derives impl_names(case, backends).
"""
from __future__ import annotations

import dataclasses
import functools

BACKENDS = ("torch", "triton", "cublas", "cuda", "auto")  # the fastpeft backends timed unless --backend says otherwise
_CONSTANTS = {"METRICS": ("fwd", "bwd", "fwd_bwd", "infer"), "FLOOR": None, "HAS_CUDA_KERNELS": False,
              "HAS_CUBLAS": False, "HAS_AUTO": False}


def _families(op, case) -> tuple:
    return op.IMPLS


def _main_metric(op, case) -> str:
    return "fwd_bwd"


def _needs_twin(op, case) -> bool:
    return False


def _accumulation(op, case) -> int:
    """The largest integer field of the case: no result accumulates over more terms than that."""
    return max(v for f in dataclasses.fields(case) if f.compare
               for v in [getattr(case, f.name)] if isinstance(v, int) and not isinstance(v, bool))


def _tiny(op, case):
    return None


_METHODS = {"families": _families, "main_metric": _main_metric, "needs_twin": _needs_twin,
            "accumulation": _accumulation, "tiny": _tiny}


def expand(families, backends=BACKENDS, has_cuda_kernels: bool = False, has_cublas: bool = False,
           has_auto: bool = False) -> list[str]:
    """Implementation names: each family, with "fastpeft" expanded to fastpeft[<backend>] per backend."""
    backs = [b for b in backends
             if (b != "cuda" or has_cuda_kernels) and (b != "cublas" or has_cublas) and (b != "auto" or has_auto)]
    return [n for f in families for n in ([f"fastpeft[{b}]" for b in backs] if f == "fastpeft" else [f])]


class OpSpec:
    """An op module with the defaults above for the names it does not define (the module's own win)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        try:
            return getattr(self.module, name)
        except AttributeError:
            pass
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in _METHODS:
            return functools.partial(_METHODS[name], self)
        raise AttributeError(f"op module {self.module.__name__} has no {name!r}")

    def impl_names(self, case, backends=BACKENDS) -> list[str]:
        """The implementations that apply to a case, for the chosen fastpeft backends."""
        return expand(self.families(case), backends, self.HAS_CUDA_KERNELS, self.HAS_CUBLAS, self.HAS_AUTO)

    def __repr__(self) -> str:
        return f"OpSpec({self.module.__name__})"


def of(op) -> OpSpec:
    """An op module, or an OpSpec, as an OpSpec."""
    return op if isinstance(op, OpSpec) else OpSpec(op)


__all__ = ["OpSpec", "of", "expand", "BACKENDS"]
