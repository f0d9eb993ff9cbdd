"""fastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`pip install -e .` works without a GPU and never pulls a CUDA build of PyTorch: install torch first
(the Makefile does). The CUDA extension (fastpeft._C) is optional; see the README's build section.
"""
from setuptools import setup

setup(
    name="fastpeft",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for LoRA, adapters and GaLore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastpeft", "fastpeft.ops", "fastpeft.modules", "fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    # torch is deliberately unpinned from above so that an installed CPU or CUDA build satisfies it.
    install_requires=["torch>=2.4", "numpy", "triton>=3.2; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "peft", "safetensors"],
        "bench": ["pytest-benchmark", "matplotlib", "peft"],
        "hf": ["transformers", "peft", "safetensors"],
    },
)
