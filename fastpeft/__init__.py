"""fastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning."""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _alias_kernels() -> None:
    # Installed packages map kernels/ to fastpeft.kernels (setup.py package_dir). A source tree on
    # PYTHONPATH has no such mapping, so load the top-level kernels/ folder under that name.
    if _ilu.find_spec("fastpeft.kernels") is not None:
        return
    root = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(root, "__init__.py")
    if not _os.path.exists(init):
        return
    spec = _ilu.spec_from_file_location("fastpeft.kernels", init, submodule_search_locations=[root])
    mod = _ilu.module_from_spec(spec)
    _sys.modules["fastpeft.kernels"] = mod
    spec.loader.exec_module(mod)


_alias_kernels()

from ._backend import backend_report  # noqa: E402
from .errors import BackendUnavailableError  # noqa: E402
from .inject_lora import count_parameters, inject_lora  # noqa: E402  (the function: it shadows its module's name)
from .modules.lora import DoRALinear, LoRALinear  # noqa: E402
from .ops.lora_linear import LoRALinearFunction, lora_linear  # noqa: E402
from .ops.dora_linear import DoRALinearFunction, dora_linear  # noqa: E402
from .ops.qlora_linear import QLoRALinearFunction, qlora_linear  # noqa: E402
from .autocast import lora_linear_amp  # noqa: E402
from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .peft_compat import patch_peft, unpatch_peft  # noqa: E402
from .ops.adapter import BottleneckAdapterFunction, bottleneck_adapter  # noqa: E402
from .ops.ia3 import IA3LinearFunction, ia3_linear  # noqa: E402
from .modules.adapter import BottleneckAdapter  # noqa: E402
from .modules.ia3 import IA3Linear  # noqa: E402
from .inject_adapters import ParallelAdapterLayer, SeriesAdapterLayer, inject_adapters  # noqa: E402
from .ops.multi_lora import MultiLoRALinearFunction, multi_lora_linear  # noqa: E402
from .modules.multi_lora import MultiLoRALinear  # noqa: E402
from .inject_multi import inject_multi_lora, load_multi_adapter, multi_lora_batch, unload_multi_adapter  # noqa: E402
# the torch.library registrations (torch.ops.fastpeft.<op>_fwd/bwd) that each op calls under torch.compile; each
# imports its op's module, never the reverse, so they are imported here
from .ops import (  # noqa: E402,F401
    adapter_custom_op as _adapter_custom_op, dora_linear_custom_op as _dora_linear_custom_op,
    ia3_custom_op as _ia3_custom_op,
    lora_linear_custom_op as _lora_linear_custom_op, multi_lora_custom_op as _multi_lora_custom_op,
    qlora_linear_custom_op as _qlora_linear_custom_op,
)
from . import distributed, galore, optim  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError", "backend_report",
    "lora_linear", "LoRALinearFunction", "LoRALinear", "inject_lora", "count_parameters",
    "dora_linear", "DoRALinearFunction", "DoRALinear", "qlora_linear", "QLoRALinearFunction",
    "lora_linear_amp", "save_adapter", "load_adapter", "patch_peft", "unpatch_peft",
    "bottleneck_adapter", "BottleneckAdapterFunction", "BottleneckAdapter", "inject_adapters",
    "SeriesAdapterLayer", "ParallelAdapterLayer", "ia3_linear", "IA3LinearFunction", "IA3Linear",
    "multi_lora_linear", "MultiLoRALinearFunction", "MultiLoRALinear", "inject_multi_lora", "load_multi_adapter",
    "unload_multi_adapter", "multi_lora_batch",
    "galore", "optim", "distributed",
]
