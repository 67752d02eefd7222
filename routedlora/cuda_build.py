"""Build, load and compile-check the CUDA C++ kernels in ``csrc/``.

:func:`load` builds ``csrc/`` with ninja through :func:`torch.utils.cpp_extension.load`
on first use and registers the ``routedlora_cuda`` ops. The build is cached under
``$ROUTEDLORA_CACHE_DIR`` (default ``~/.cache/routedlora``), one folder per torch
version, CUDA version, GPU architectures and source hash, so a second process loads
it in milliseconds and a changed source or a different GPU rebuilds.

:func:`unavailable_reason` says, without building anything, why the ``cuda`` backend
cannot run (a CPU build of torch, no CUDA device, no nvcc, no ninja, a GPU older than
sm_80); ``backend="cuda"`` raises :class:`CudaBackendUnavailable` with that reason.

``python -m routedlora.cuda_build --check`` compiles every ``.cu`` file on its own with
the machine's nvcc for sm_80 and sm_90a (compile only, no GPU needed) and syntax-checks
the torch bindings with the host compiler; any error or warning fails it. CI runs it
through ``tests/test_csrc.py``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .backends import CudaBackendUnavailable  # noqa: F401  (raised here, defined with the switch)

COMPILE_CHECK_ARCHS = ("sm_80", "sm_90a")
MIN_CAPABILITY = (8, 0)
OPS_NAMESPACE = "routedlora_cuda"
# the compile check's nvcc flags: the ones torch.utils.cpp_extension passes to nvcc (its
# half/bfloat16 operator switches off), at the oldest C++ standard torch builds with
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
NVCC_WARNINGS = ("-Xcompiler", "-Wall,-Wextra", "-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage")


def csrc_dir() -> Path:
    """The kernel sources: installed as ``routedlora.csrc``, or ``csrc/`` of a checkout."""
    try:
        from routedlora import csrc

        return Path(csrc.__file__).resolve().parent
    except ImportError:  # pragma: no cover - a checkout without the package mapping
        return Path(__file__).resolve().parent.parent / "csrc"


def kernel_sources() -> List[Path]:
    return sorted(csrc_dir().glob("*.cu"))


def build_sources() -> List[Path]:
    return kernel_sources() + [csrc_dir() / "bindings.cpp"]


def _source_digest() -> str:
    files = sorted(p for p in csrc_dir().iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def find_nvcc() -> Optional[str]:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def unavailable_reason(device=None) -> Optional[str]:
    """Why the ``cuda`` backend cannot serve tensors on ``device`` (None: it can, if the build succeeds)."""
    if torch.version.cuda is None:
        kind = "a ROCm" if getattr(torch.version, "hip", None) else "a CPU-only"
        return (f"backend='cuda' needs a CUDA build of torch; this is {kind} build ({torch.__version__}). "
                "Use backend='triton' or 'torch'")
    if device is not None and torch.device(device).type != "cuda":
        return f"backend='cuda' runs on CUDA tensors; these are on {torch.device(device)}"
    if not torch.cuda.is_available():
        return "backend='cuda': no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver?)"
    index = torch.device(device).index if device is not None else None
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        return (f"backend='cuda' needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
                f"{torch.cuda.get_device_name(index)} is {cap[0]}.{cap[1]}")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "backend='cuda' builds its kernels with ninja on first use: pip install ninja"
    if find_nvcc() is None:
        return ("backend='cuda' builds its kernels on first use and found no CUDA toolkit: install nvcc "
                f"(CUDA {torch.version.cuda}, as torch was built with) and set CUDA_HOME")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "backend='cuda' runs every forward and backward through the triton kernels: pip install triton"
    return None


def cache_root() -> Path:
    return Path(os.environ.get("ROUTEDLORA_CACHE_DIR", Path.home() / ".cache" / "routedlora"))


def _archs() -> List[str]:
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"{major}.{minor}" for major, minor in caps]


def build_key() -> str:
    archs = "-".join(a.replace(".", "") for a in _archs())
    return f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{archs}-{_source_digest()}".replace("+", "_")


_lock = threading.Lock()
_loaded = False
_failure: Optional[str] = None


def load(device=None, verbose: bool = False) -> None:
    """Build (first time) and load the ``routedlora_cuda`` ops; raise :class:`CudaBackendUnavailable` if not possible."""
    global _loaded, _failure
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        reason = unavailable_reason(device)
        if reason is None and _failure is not None:
            reason = _failure
        if reason is not None:
            raise CudaBackendUnavailable(reason)
        from torch.utils import cpp_extension

        key = build_key()
        build_dir = cache_root() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(_archs())
        try:
            cpp_extension.load(
                name="routedlora_cuda_" + key.rsplit("-", 1)[-1],
                sources=[str(p) for p in build_sources()],
                extra_include_paths=[str(csrc_dir())],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose or bool(os.environ.get("ROUTEDLORA_VERBOSE_BUILD")),
            )
        except Exception as exc:  # a compiler error: keep it, do not retry on every call
            _failure = (f"backend='cuda': building csrc/ failed ({type(exc).__name__}: {exc}). "
                        f"Build folder: {build_dir}; set ROUTEDLORA_VERBOSE_BUILD=1 to see the compiler")
            raise CudaBackendUnavailable(_failure) from exc
        finally:
            if arch_env is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_env
        _loaded = True


def is_loaded() -> bool:
    return _loaded


# --- compile check (CI: no GPU, no CUDA torch needed) --------------------------------


def _torch_includes() -> List[str]:
    from torch.utils import cpp_extension

    return cpp_extension.include_paths()


def cuda_include_dir() -> Optional[str]:
    """The toolkit's include folder (nvcc may be a wrapper script outside the toolkit)."""
    from torch.utils import cpp_extension

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = find_nvcc()
    if nvcc is not None:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and Path(root, "include", "cuda_runtime.h").exists():
            return str(Path(root, "include"))
    return None


def _run(cmd: Sequence[str]) -> tuple:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    # any warning fails the check, including ptxas's (spills, local memory), which -Werror does not cover
    failed = proc.returncode != 0 or "warning" in out.lower()
    return failed, out


def _require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("no nvcc on PATH or under CUDA_HOME")
    return nvcc


def compile_check(archs: Sequence[str] = COMPILE_CHECK_ARCHS, bindings: bool = True) -> List[tuple]:
    """Compile each ``.cu`` for each arch (``nvcc -c``) and syntax-check ``bindings.cpp``.

    Returns ``[(what, failed, output)]``. Raises FileNotFoundError when there is no nvcc.
    """
    nvcc = _require_nvcc()
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in kernel_sources():
            for arch in archs:
                obj = Path(tmp) / f"{src.stem}-{arch}.o"
                cmd = [nvcc, "-c", *NVCC_FLAGS, *NVCC_WARNINGS, f"-arch={arch}", f"-I{csrc_dir()}", str(src),
                       "-o", str(obj)]
                jobs.append((f"{src.name} [{arch}]", cmd))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            outs = list(pool.map(lambda job: _run(job[1]), jobs))
            results = [(name, failed, out) for (name, _), (failed, out) in zip(jobs, outs)]
            if bindings:
                results.append(_check_bindings(tmp))
    return results


# each kernel's block size (csrc/*.cu)
KERNEL_THREADS = {"group_by_row_kernel": 1024}


def kernel_resources(arch: str = "sm_90a") -> List[dict]:
    """Registers, spills and static shared memory of every csrc kernel instantiation, from ptxas -v.

    One dict per instantiation: ``kernel``, ``flags`` (its bool template arguments in order),
    ``registers``, ``spill_bytes``, ``shared_bytes``, ``threads``. Raises FileNotFoundError when
    there is no nvcc.
    """
    import re

    nvcc = _require_nvcc()
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in kernel_sources():
            cmd = [nvcc, "-c", *NVCC_FLAGS, f"-arch={arch}", "-Xptxas", "-v", f"-I{csrc_dir()}", str(src),
                   "-o", str(Path(tmp) / "k.o")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            entry = None
            for line in (proc.stdout + proc.stderr).splitlines():
                m = re.search(r"Compiling entry function '([^']+)'", line)
                if m:
                    name = m.group(1)
                    k = re.search(r"(%s)I(.*?)EEv" % "|".join(KERNEL_THREADS), name)
                    flags = [b == "1" for b in re.findall(r"Lb([01])E", k.group(2))]
                    entry = dict(kernel=k.group(1), flags=flags, threads=KERNEL_THREADS[k.group(1)])
                    found.append(entry)
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and entry is not None:
                    entry["spill_bytes"] = int(m.group(1)) + int(m.group(2))
                m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
                if m and entry is not None:
                    entry["registers"] = int(m.group(1))
                    entry["shared_bytes"] = int(m.group(2) or 0)
    return found


def _check_bindings(tmp: str) -> tuple:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    cuda_inc = cuda_include_dir()
    if cxx is None or cuda_inc is None:
        return ("bindings.cpp [syntax]", True, "no host C++ compiler or no CUDA include folder")
    includes = _torch_includes()
    # a CPU wheel ships the c10/cuda headers but not the CMake-generated one they include
    stub = Path(tmp) / "stub"
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        (stub / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-isystem", str(stub)]
    for p in includes + [cuda_inc]:
        cmd += ["-isystem", p]
    cmd += [f"-I{csrc_dir()}", str(csrc_dir() / "bindings.cpp")]
    failed, out = _run(cmd)
    return ("bindings.cpp [syntax, host compiler]", failed, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routedlora.cuda_build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compile-check csrc/ (nvcc -c per .cu; no GPU needed)")
    ap.add_argument("--arch", action="append", help=f"arch to check (default {', '.join(COMPILE_CHECK_ARCHS)})")
    ap.add_argument("--build", action="store_true", help="build and load the extension for the visible GPUs")
    args = ap.parse_args(argv)
    if args.build:
        load(verbose=True)
        print(f"routedlora_cuda loaded from {cache_root() / build_key()}")
        return 0
    if not args.check:
        ap.print_help()
        return 2
    try:
        results = compile_check(tuple(args.arch or COMPILE_CHECK_ARCHS))
    except FileNotFoundError as exc:
        print(f"compile check: {exc}", file=sys.stderr)
        return 1
    bad = 0
    for what, failed, out in results:
        print(f"{'FAIL' if failed else 'ok  '} {what}")
        if failed:
            bad += 1
            print(out)
    print(f"{len(results) - bad}/{len(results)} compiled clean with {find_nvcc()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
