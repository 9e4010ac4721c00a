"""Build and load the fused CPU kernels of the wave cell (`wave_kernels.cpp`).

torch's extension builder compiles the source with the system C++ compiler and ninja, which takes about a
minute once per machine. It caches the library under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR),
so later processes load it at once. Where the build is not possible (no compiler, a CPU without AVX2) the
wave cell falls back to its torch-op implementation, with one warning. Set DYNLAB_FUSED_CELL=0 to use
the fallback everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("wave_kernels.cpp")
BUILD_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=fast", "-fopenmp-simd"]


def add_pip_ninja_to_path() -> None:
    """Put the ninja of the `ninja` pip package on PATH, where torch's builder looks for it."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def fused_kernels() -> ModuleType | None:
    """Return the compiled kernels, or None where they are switched off or cannot be built here."""
    if os.environ.get("DYNLAB_FUSED_CELL", "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.warning(
            "fused wave cell not used: it needs AVX2 but this CPU reports %s, so the torch-op cell runs", capability
        )
        return None
    if shutil.which("ninja") is None:
        add_pip_ninja_to_path()
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="dynlab_wave_kernels",
            sources=[str(SOURCE)],
            extra_cflags=BUILD_FLAGS,
            extra_ldflags=["-lmvec"],  # glibc's vectorised tanhf
        )
    except Exception as error:  # a missing compiler or ninja raises several types
        log.warning(
            "fused wave cell could not be built (%s): using the torch-op cell, which is slower. "
            "Install a C++ compiler and ninja, or set DYNLAB_FUSED_CELL=0 to skip the build.",
            error,
        )
        return None
