"""Locate (and build) ``liblrexport_ops.so``, the ONNX Runtime custom-op library of lrexport.

The library implements ``LowRankKVAttention`` (domain ``lrexport``) for the CPU execution
provider and, when a CUDA compiler is found at build time, for the CUDA execution provider too;
see ``docs/custom_op.md``. It is built from ``custom_ops/`` with CMake into
``build/custom_ops/`` against ONNX Runtime headers: ``ORT_INCLUDE_DIR`` when set, else
Debian trixie's ``libonnxruntime-dev`` fetched by ``custom_ops/fetch_ort_headers.sh`` into
``build/ort-headers/``.

The CUDA compiler (:func:`find_nvcc`): ``CUDACXX``, else ``nvcc`` on ``PATH``, else
``/usr/local/cuda/bin/nvcc``, else the one of the ``nvidia-cuda-nvcc`` pip package (with
``nvidia-nvvm``, ``nvidia-cuda-crt``, ``nvidia-cuda-cccl`` and ``nvidia-cuda-runtime``). None found:
the CPU kernel is built alone. ``LREXPORT_CUDA=OFF`` never builds the CUDA kernel, ``ON`` requires it.

* :func:`library_path` -- the ``.so``, built first when it is missing (or older than its sources);
* :func:`session_options` -- an ``onnxruntime.SessionOptions`` with the library registered;
* ``python -m lrexport.ortops`` -- builds it and prints its path (``--asan`` for an
  AddressSanitizer build in ``build/custom_ops-asan/``).

``LREXPORT_OPS_LIB`` names a prebuilt library to use instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lrexport.errors import LrexportError

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / "custom_ops"
BUILD_DIR = REPO_ROOT / "build" / "custom_ops"
ASAN_BUILD_DIR = REPO_ROOT / "build" / "custom_ops-asan"
HEADERS_DIR = REPO_ROOT / "build" / "ort-headers"
FETCH_SCRIPT = SOURCE_DIR / "fetch_ort_headers.sh"
LIB_NAME = "liblrexport_ops.so"
DOMAIN = "lrexport"
OP_NAME = "LowRankKVAttention"
ENV_LIB = "LREXPORT_OPS_LIB"
ENV_CUDA = "LREXPORT_CUDA"  # AUTO (default), ON, OFF

__all__ = ["DOMAIN", "OP_NAME", "build", "find_nvcc", "has_cuda_kernel", "library_path", "session_options"]


def _sources() -> list[Path]:
    return [SOURCE_DIR / "CMakeLists.txt", *sorted((SOURCE_DIR / "src").glob("*")),
            *sorted((SOURCE_DIR / "src" / "cuda").glob("*"))]


def _stale(lib: Path) -> bool:
    if not lib.exists():
        return True
    if not SOURCE_DIR.is_dir():  # an installed package without the sources: take the library as it is
        return False
    built = lib.stat().st_mtime
    return any(p.stat().st_mtime > built for p in _sources() if p.is_file())


def library_path(build: bool = True) -> Path:
    """The path of ``liblrexport_ops.so``.

    When it is missing or older than its sources and ``build`` is true, it is built first (see
    :func:`build`); with ``build`` false a missing library raises :class:`LrexportError`.
    """
    env = os.environ.get(ENV_LIB)
    if env:
        p = Path(env)
        if not p.is_file():
            raise LrexportError(f"{ENV_LIB}={env} is not a file")
        return p
    lib = BUILD_DIR / LIB_NAME
    if not _stale(lib):
        return lib
    if build:
        return _build_default()
    if lib.exists():
        return lib
    raise LrexportError(
        f"the custom-op library {lib} is not built: run `make custom-ops` or `python -m lrexport.ortops`"
    )


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    except OSError as e:
        raise LrexportError(f"{what}: cannot run {cmd[0]}: {e}") from e
    if res.returncode != 0:
        raise LrexportError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{_tail(res.stdout + res.stderr)}")
    return res.stdout


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build at a time (concurrent test processes share build/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ort_include_dir() -> Path:
    """The ONNX Runtime headers: ``ORT_INCLUDE_DIR``, else a system copy, else Debian's
    ``libonnxruntime-dev`` fetched into ``build/ort-headers`` (once)."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        p = Path(env)
        if not (p / "onnxruntime_cxx_api.h").is_file():
            raise LrexportError(f"ORT_INCLUDE_DIR={env} holds no onnxruntime_cxx_api.h")
        return p
    for system in (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")):
        if (system / "onnxruntime_cxx_api.h").is_file() and (system / "onnxruntime_c_api.h").is_file():
            return system
    if not shutil.which("bash"):
        raise LrexportError("bash is needed to fetch the ONNX Runtime headers; set ORT_INCLUDE_DIR instead")
    try:
        res = subprocess.run(["bash", str(FETCH_SCRIPT), str(HEADERS_DIR)], capture_output=True, text=True,
                             check=False)
    except OSError as e:
        raise LrexportError(f"cannot run {FETCH_SCRIPT}: {e}") from e
    if res.returncode != 0:
        raise LrexportError(
            "could not fetch the ONNX Runtime headers (Debian libonnxruntime-dev); set ORT_INCLUDE_DIR to a "
            f"folder with onnxruntime_cxx_api.h instead.\n{_tail(res.stderr)}"
        )
    lines = res.stdout.strip().splitlines()
    if not lines or not (Path(lines[-1]) / "onnxruntime_cxx_api.h").is_file():
        raise LrexportError(f"{FETCH_SCRIPT} printed no header folder:\n{_tail(res.stdout + res.stderr)}")
    return Path(lines[-1])


def _pip_nvcc_candidates() -> list[Path]:
    """nvcc of the CUDA toolkit's pip packages: ``nvidia/cu13/bin/nvcc`` (CUDA 13 puts the whole
    toolkit under one root), ``nvidia/cuda_nvcc/bin/nvcc`` (CUDA 12)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    found = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        base = Path(base)
        found += sorted(base.glob("cu[0-9]*/bin/nvcc"), reverse=True)  # newest CUDA first
        found += [p for p in [base / "cuda_nvcc" / "bin" / "nvcc"] if p.exists()]
    return found


def _cuda_flags_for(nvcc: Path) -> list[str]:
    """Extra nvcc flags a toolkit laid out by pip needs: its libraries are in ``<root>/lib``, where
    nvcc (which looks in ``<root>/lib64``) does not find them."""
    root = nvcc.resolve().parent.parent
    if not (root / "lib64").is_dir() and (root / "lib" / "libcudart_static.a").is_file():
        return [f"-L{root / 'lib'}"]
    return []


def find_nvcc() -> tuple[Path | None, str]:
    """The CUDA compiler for the optional CUDA kernel, and where it came from (or why none).

    ``CUDACXX``, else ``nvcc`` on ``PATH``, else ``/usr/local/cuda/bin/nvcc``, else the pip
    package's. A pip nvcc needs ``nvidia-nvvm`` beside it (its ``cicc``); without it, it is skipped.
    CMake then checks that the compiler works (``check_language(CUDA)``).
    """
    env = os.environ.get("CUDACXX")
    if env:
        return Path(env), "CUDACXX"
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path), "PATH"
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda/bin/nvcc"), "/usr/local/cuda"
    reasons = []
    for nvcc in _pip_nvcc_candidates():
        root = nvcc.resolve().parent.parent
        if not (root / "nvvm" / "bin" / "cicc").is_file():
            reasons.append(f"{nvcc} lacks {root / 'nvvm/bin/cicc'} (pip install nvidia-nvvm)")
            continue
        return nvcc, "pip package"
    return None, "; ".join(reasons) or "no nvcc (CUDACXX, PATH, /usr/local/cuda, pip nvidia-cuda-nvcc)"


def _cuda_mode(asan: bool) -> str:
    mode = os.environ.get(ENV_CUDA, "AUTO").strip().upper() or "AUTO"
    if mode in ("1", "YES", "TRUE"):
        mode = "ON"
    if mode in ("0", "NO", "FALSE"):
        mode = "OFF"
    if mode not in ("AUTO", "ON", "OFF"):
        raise LrexportError(f"{ENV_CUDA}={mode}: expected AUTO, ON or OFF")
    return "OFF" if asan and mode == "AUTO" else mode  # ASan builds test the CPU kernel


def _cached(build_dir: Path, key: str) -> str | None:
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1] if "=" in line else ""
    return None


def has_cuda_kernel(lib: Path | None = None) -> bool:
    """Whether the library (``lib``, default :func:`library_path` without building) has the CUDA
    kernel. Loads it with ctypes: it needs neither ONNX Runtime nor a GPU for that."""
    import ctypes

    path = Path(lib) if lib is not None else library_path(build=False)
    try:
        fn = ctypes.CDLL(str(path)).lrexport_ops_has_cuda
    except (OSError, AttributeError):
        return False
    fn.restype = ctypes.c_int
    return bool(fn())


def build(build_dir: Path | None = None, asan: bool = False, jobs: int = 2, extra_args: Sequence[str] = ()) -> Path:
    """Configure and build the library with CMake; return the ``.so``.

    ``build_dir`` defaults to ``build/custom_ops`` (``build/custom_ops-asan`` with ``asan``).
    The CUDA kernel is built when :func:`find_nvcc` finds a compiler that works (``LREXPORT_CUDA``:
    AUTO, the default; ``ON`` fails without one; ``OFF``; ASan builds are CPU-only unless ``ON``).
    Raises :class:`LrexportError` when CMake, a C++ compiler or the headers are missing, or the
    build fails (with the end of its output).
    """
    if not SOURCE_DIR.is_dir():
        raise LrexportError(f"the custom-op sources are not here ({SOURCE_DIR}); set {ENV_LIB} to a built library")
    build_dir = Path(build_dir) if build_dir is not None else (ASAN_BUILD_DIR if asan else BUILD_DIR)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise LrexportError("cmake is not installed: it is needed to build the custom-op library "
                            "(Debian: apt-get install cmake g++)")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or not shutil.which(cxx):
        raise LrexportError("no C++ compiler found (c++, g++ or clang++): it is needed to build the custom-op "
                            "library (Debian: apt-get install g++)")
    mode = _cuda_mode(asan)
    env = dict(os.environ)
    cuda_args = [f"-DLREXPORT_CUDA={mode}"]
    if mode != "OFF":
        nvcc, _ = find_nvcc()
        if nvcc is not None:
            env["CUDACXX"] = str(nvcc)
            flags = _cuda_flags_for(nvcc)
            if flags:
                env["CUDAFLAGS"] = " ".join([env.get("CUDAFLAGS", ""), *flags]).strip()
            cached = _cached(build_dir, "CMAKE_CUDA_COMPILER")
            if cached is not None and (cached == "" or cached.endswith("NOTFOUND")):
                cuda_args.append("-UCMAKE_CUDA_COMPILER")  # not found last time: look again
    generator = []
    if (not (build_dir / "CMakeCache.txt").is_file() and "CMAKE_GENERATOR" not in os.environ
            and not shutil.which("make") and shutil.which("ninja")):
        generator = ["-G", "Ninja"]  # CMake's default generator needs make
    with _lock(REPO_ROOT / "build" / ".custom_ops.lock"):
        include = ort_include_dir()
        configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DORT_INCLUDE_DIR={include}", f"-DLREXPORT_ASAN={'ON' if asan else 'OFF'}", *cuda_args,
                     *extra_args]
        out = _run(configure, "CMake configure of the custom-op library", env=env)
        _run([cmake, "--build", str(build_dir), "-j", str(max(1, jobs))], "build of the custom-op library", env=env)
    global last_cuda_status
    last_cuda_status = next((line.removeprefix("-- lrexport: ") for line in out.splitlines()
                             if "lrexport: CUDA kernel" in line or "the CUDA kernel is skipped" in line), "")
    lib = build_dir / LIB_NAME
    if not lib.is_file():
        raise LrexportError(f"the build finished but {lib} is missing")
    lib.touch()  # newer than the sources even when the build had nothing to do
    return lib


# The CMake line of the last build() about the CUDA kernel ("CUDA kernel enabled: ..." or why not).
last_cuda_status = ""


def _build_default() -> Path:
    return build()


def _provider_names(providers: Sequence[Any] | None) -> list[str]:
    names = []
    for p in providers or ():
        name = p[0] if isinstance(p, tuple | list) else p
        if not isinstance(name, str):
            raise LrexportError(f"providers: expected names or (name, options) pairs, got {p!r}")
        names.append(name)
    return names


def session_options(providers: Sequence[Any] | None = None, options: Any = None, build: bool = True):
    """An ``onnxruntime.SessionOptions`` (``options`` or a new one) with the library registered.

    ``providers`` -- those the session will use (names or ``(name, options)`` pairs, as given to
    ``InferenceSession``) -- are checked against the installed runtime. A library without the
    CUDA kernel runs ``LowRankKVAttention`` on the CPU execution provider in a CUDA session (ONNX
    Runtime copies its inputs and outputs), so CPU fallback must then stay enabled.
    """
    import onnxruntime as ort

    names = _provider_names(providers)
    available = set(ort.get_available_providers())
    missing = [n for n in names if n not in available]
    if missing:
        raise LrexportError(f"execution providers {missing} are not available in this onnxruntime "
                            f"(available: {sorted(available)})")
    so = options if options is not None else ort.SessionOptions()
    try:
        no_fallback = so.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    except Exception:  # not set
        no_fallback = False
    lib = library_path(build=build)
    gpu_ok = "CUDAExecutionProvider" in names and has_cuda_kernel(lib)
    if names and "CPUExecutionProvider" not in names and no_fallback and not gpu_ok:
        raise LrexportError(f"the custom-op library {lib} has no kernel for {names} (CPU only; the CUDA kernel "
                            "is built when a CUDA compiler is found): keep CPU fallback enabled or add "
                            "CPUExecutionProvider to the providers")
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # onnxruntime raises its own exception types
        raise LrexportError(f"onnxruntime could not load the custom-op library {lib}: {e}") from e
    return so


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrexport.ortops",
                                 description="Build liblrexport_ops.so and print its path.")
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer build (build/custom_ops-asan)")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--cuda", choices=["auto", "on", "off"], default=None,
                    help=f"the CUDA kernel: auto (when a CUDA compiler is found), on (required), off "
                         f"(default: ${ENV_CUDA} or auto)")
    args = ap.parse_args(argv)
    if args.cuda:
        os.environ[ENV_CUDA] = args.cuda.upper()
    try:
        lib = build(asan=args.asan, jobs=args.jobs)
        if last_cuda_status:
            print(last_cuda_status, file=sys.stderr)
        print(lib)
    except LrexportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
