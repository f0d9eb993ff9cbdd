"""fastpeft optimizers: GaLoreAdamW (galore-torch semantics, fused Triton step, gradient-free nn.Linear mode)."""
from .galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
