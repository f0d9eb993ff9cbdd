"""How a dropout kernel gets its seed and is launched: shared by every launcher that draws or regenerates a mask
(kernels/lora_linear.py, lora_decode.py, lora_skinny.py, qlora_linear.py)."""
from __future__ import annotations

import torch


def seed_arg(seed, device: torch.device) -> tuple:
    """(the kernel's seed argument, SEED_PTR): an int as it is; a 0-d int64 tensor on `device`, loaded by the kernel."""
    if not isinstance(seed, torch.Tensor):
        return seed, False
    if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"seed: expected an int or a 0-d torch.int64 tensor on {device} (the kernels' device), "
                         f"got shape {tuple(seed.shape)}, {seed.dtype} on {seed.device}")
    return seed, True


# compiled int-seed dropout kernels whose tensor-seed variant is loaded too (_launch)
_TENSOR_SEED_READY: set = set()


def _launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), with `seed`, HAS_DROPOUT and SEED_PTR among the keywords.

    On a GPU, a dropout launch with an int seed also compiles and loads, once per compiled kernel, the same
    kernel with the seed as a tensor, launched on an empty grid (no work). A CUDA graph capture of the same call
    (fastpeft.dropout.draw_seed hands the kernels a tensor there) then finds it loaded: warm-up runs outside
    capture see int seeds, and loading a module during capture fails ("operation not permitted when stream is
    capturing")."""
    compiled = kernel[grid](*args, **kwargs)
    if (kwargs["HAS_DROPOUT"] and not kwargs["SEED_PTR"] and args[0].device.type == "cuda"
            and compiled not in _TENSOR_SEED_READY):
        seed_t = torch.zeros((), dtype=torch.int64, device=args[0].device)
        kernel[(0,)](*args, **{**kwargs, "seed": seed_t, "SEED_PTR": True})
        _TENSOR_SEED_READY.add(compiled)
    return compiled
