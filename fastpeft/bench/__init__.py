"""Latency and memory benchmarks of fastpeft against the baselines users would pick instead.

Run `python -m fastpeft.bench --help`. The modules: harness (timing, peak memory, saved activations, run
metadata), lora_cases (cases, implementations, correctness check), report (tables, JSON, plot).
"""
from .harness import SavedTensors, environment, time_fn
from .lora_cases import PRESETS, Case, Settings, preset_cases, run_case

__all__ = ["SavedTensors", "environment", "time_fn", "PRESETS", "Case", "Settings", "preset_cases", "run_case"]
