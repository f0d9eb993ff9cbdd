"""Environment switches read by both the backend selection (fastpeft/_backend.py) and the kernels
(kernels/common.py). Imports nothing but the standard library: no Triton, no torch."""
from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU tensors under Triton's interpreter. Triton reads the
    variable when it is imported, so it must be set before the first `import triton`."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
