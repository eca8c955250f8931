"""How setup.py decides what to compile. Standard library only: setup.py loads this file before torch's build
helpers, and tests exercise it without building anything.

CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit is found; a visible GPU plays no part.
LEGW_FUSED_SKIP_CUDA_BUILD=1 / LEGW_FUSED_FORCE_CUDA_BUILD=1 override; CUDA_HOME / CUDA_PATH name the toolkit.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # sm_80 SASS runs on every Ampere; PTX lets newer GPUs JIT the Hopper code.
# csrc/cuda/fused_step.cu passes its launch metadata as kernel parameters of 24,720 bytes; nvcc accepts parameters
# over 4 KB from 12.1 on.
MIN_NVCC = (12, 1)


class BuildConfigError(RuntimeError):
    """A build was asked for that cannot be made here; the message says why and what to do."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(folder: str | os.PathLike | None) -> bool:
    return bool(folder) and (Path(folder) / "bin" / "nvcc").is_file() and \
        (Path(folder) / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> tuple[str | None, str]:
    """The CUDA toolkit folder, and how it was found (or why none was).

    torch guesses the toolkit as the parent of the ``nvcc`` on PATH, which is wrong when that nvcc is a link or
    wrapper script outside the toolkit (as on our CI machines); so also ask nvcc itself where it lives.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if _is_toolkit(os.environ[var]):
                return os.environ[var], f"${var}"
            return None, f"${var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_toolkit(real.parent.parent):
            return str(real.parent.parent), f"nvcc at {nvcc}"
        try:  # `nvcc --dryrun` prints the toolkit root as "#$ TOP=<root>/bin/.." whatever wraps it
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
                    if _is_toolkit(top):
                        return top, f"nvcc at {nvcc} (TOP={top})"
        except (OSError, subprocess.SubprocessError):
            pass
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no nvcc on PATH and no CUDA_HOME / CUDA_PATH / /usr/local/cuda toolkit"


def nvcc_version(home: str) -> tuple[int, int] | None:
    """The release of the toolkit's nvcc, e.g. (13, 0); None when it cannot be run or does not say."""
    try:
        out = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(found[1]), int(found[2])) if found else None


def cuda_decision(torch_cuda_version: str | None) -> tuple[bool, str | None, str]:
    """(build CUDA sources?, toolkit folder, reason)."""
    if _flag("LEGW_FUSED_SKIP_CUDA_BUILD"):
        return False, None, "LEGW_FUSED_SKIP_CUDA_BUILD=1"
    force = _flag("LEGW_FUSED_FORCE_CUDA_BUILD")
    if torch_cuda_version is None:
        reason = "the installed torch is a CPU-only build (torch.version.cuda is None)"
    else:
        home, how = find_cuda_toolkit()
        version = nvcc_version(home) if home is not None else None
        if home is None:
            reason = f"torch is a CUDA {torch_cuda_version} build but no CUDA toolkit was found: {how}"
        elif version is not None and version < MIN_NVCC:
            reason = (f"the CUDA toolkit at {home} (found via {how}) has nvcc {version[0]}.{version[1]}; the CUDA "
                      f"kernels need nvcc >= {MIN_NVCC[0]}.{MIN_NVCC[1]} (kernel parameters over 4 KB)")
        else:
            return True, home, f"torch CUDA {torch_cuda_version}, toolkit {home} (found via {how})"
    if force:
        raise BuildConfigError(f"LEGW_FUSED_FORCE_CUDA_BUILD=1 but the CUDA sources cannot be built: {reason}. "
                               f"Install a CUDA build of torch and a matching toolkit, or set CUDA_HOME to the "
                               f"toolkit folder.")
    return False, None, reason


def extra_cuda_include_dirs(torch_dir: Path) -> list[str]:
    """Headers torch includes that a minimal toolkit may lack (cusparse.h), taken from the nvidia-* wheels."""
    site = torch_dir.parent
    return sorted({str(Path(h).parent) for h in glob.glob(str(site / "nvidia" / "*" / "include" / "cusparse.h"))})
