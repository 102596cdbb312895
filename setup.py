"""Build script: the fastanalog package and its compiled analog-update kernels.

Extension (built with torch.utils.cpp_extension; optional):

* ``fastanalog._C``: the C++ CPU kernels, ``csrc/analog_update.cpp`` (OpenMP), with portable
  flags only (no ``-march``: the file compiles its AVX2 path with a target pragma and picks
  it at run time); plus the CUDA kernels, ``csrc/cuda/analog_update.cu``, when torch was
  built with CUDA and nvcc is found (``CUDA_HOME``, else ``/usr/local/cuda``), for the GPU
  architectures in ``TORCH_CUDA_ARCH_LIST``, else those of the installed torch (+PTX).

torch must be importable while building, so install with ``pip install
--no-build-isolation -e .`` (the Makefile does). Without torch, or if a compile fails, the
package installs without that extension and ``fastanalog.ops.cpp`` builds the CPU kernels
at first use (JIT) or falls back to the reference backend. ``FASTANALOG_NO_EXT=1`` skips
the extensions; ``FASTANALOG_NO_CUDA=1`` builds the CPU kernels alone (a quicker build while
working on them). ``MAX_JOBS`` bounds parallel compile jobs.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# Explicitly rounded intrinsics keep the CUDA arithmetic uncontracted; nothing else needed.
NVCC_FLAGS = ["-O3", "--threads", "2"]


def _cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else /usr/local/cuda, if it holds nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _extensions():
    if os.environ.get("FASTANALOG_NO_EXT", "") == "1":
        return [], {}
    cuda_home = None if os.environ.get("FASTANALOG_NO_CUDA", "") == "1" else _cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when imported; a wrapper script named nvcc
        # on PATH would otherwise make it guess a wrong root.
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastanalog: torch is not importable at build time; skipping the compiled kernels", file=sys.stderr)
        return [], {}

    include = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]
    cpu_source = os.path.join("csrc", "analog_update.cpp")
    cuda_source = os.path.join("csrc", "cuda", "analog_update.cu")

    def cpu_only():
        return cpp_extension.CppExtension(
            "fastanalog._C",
            [cpu_source],
            include_dirs=include,
            extra_compile_args={"cxx": CPU_FLAGS},
            extra_link_args=["-fopenmp"],
        )

    if torch.version.cuda is not None and cuda_home is not None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = [a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
            archs = [f"{a[:-1]}.{a[-1]}" for a in archs] or ["8.0", "9.0"]
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) + "+PTX"
        # One library with both: ninja compiles the two sources side by side.
        ext = cpp_extension.CUDAExtension(
            "fastanalog._C",
            [cpu_source, cuda_source],
            include_dirs=include,
            extra_compile_args={"cxx": CPU_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpu_only()

    class BuildKernels(cpp_extension.BuildExtension):
        """Builds the kernels; if the CUDA part fails, the CPU kernels alone; if that fails, nothing."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # a compiler or toolkit failure must not fail the install
                print(f"fastanalog: building {ext.name} failed ({exc})", file=sys.stderr)
            if any(s.endswith(".cu") for s in ext.sources):
                try:
                    super().build_extension(cpu_only())
                    print("fastanalog: built the CPU kernels without the CUDA ones", file=sys.stderr)
                    return
                except Exception as exc:
                    print(f"fastanalog: building the CPU kernels failed ({exc})", file=sys.stderr)
            print("fastanalog: installing without compiled kernels (they are built at first use)", file=sys.stderr)
            self.failed = True

        def get_outputs(self):
            return [] if getattr(self, "failed", False) else super().get_outputs()

        def copy_extensions_to_source(self):
            if not getattr(self, "failed", False):
                super().copy_extensions_to_source()

    return [ext], {"build_ext": BuildKernels}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
