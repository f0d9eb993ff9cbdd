"""Merge flags in state_dict: a layer that folds its adapter into the base weight (merge()) saves that it did.

Without the flag, loading a merged layer's state_dict (W0 + ΔW, and the adapter) into an unmerged layer would
add the adapter a second time in every forward, and the reverse would drop it. The flags travel as the
module's `_extra_state`, a bool tensor (so safetensors checkpoints, e.g. HF Trainer's, take it); loading sets
them, so the layer computes what the saved one did. A state_dict saved before the flags existed has no such
key: it loads, strict or not, and leaves the flags as they are. PEFT-format adapter files
(fastpeft.save_adapter) hold lora_A and lora_B only, never this key.
"""
from __future__ import annotations

import torch


class MergedState:
    """Mixin for an nn.Module whose boolean attributes named in `_merge_flags` describe its weights."""

    _merge_flags: tuple[str, ...] = ("merged",)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([bool(getattr(self, f)) for f in self._merge_flags])

    def set_extra_state(self, state) -> None:
        n = len(self._merge_flags)
        if not isinstance(state, torch.Tensor) or state.numel() != n or state.is_floating_point() \
                or state.is_complex():
            raise ValueError(f"{type(self).__name__}: expected `_extra_state` to be a bool tensor of {n} element(s) "
                             f"({', '.join(self._merge_flags)}), got {state!r:.80}")
        for f, v in zip(self._merge_flags, state.reshape(-1).tolist()):
            setattr(self, f, bool(v))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:  # saved before the flags were: keep the layer's own
            missing_keys.remove(key)


__all__ = ["MergedState"]
