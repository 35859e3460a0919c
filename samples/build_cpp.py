"""Configure and build the C++ sample (``samples/cpp``) into ``build/samples-cpp/``.

    python samples/build_cpp.py              # prints the path of the built lrexport_generate
    python samples/build_cpp.py --no-ops     # do not build liblrexport_ops.so as well

What it finds and passes to CMake:

* ``ORT_LIB``: the ONNX Runtime shared library of the installed onnxruntime wheel
  (``onnxruntime/capi/libonnxruntime.so.*``), or the environment variable ``ORT_LIB``;
* ``ORT_INCLUDE_DIR``: the ONNX Runtime headers from :func:`lrexport.ortops.ort_include_dir`
  (``ORT_INCLUDE_DIR``, a system copy, or Debian's ``libonnxruntime-dev`` fetched into
  ``build/ort-headers/`` by ``custom_ops/fetch_ort_headers.sh``);
* ``JSON_INCLUDE_DIR``: nlohmann/json (``JSON_INCLUDE_DIR``, a system copy, or Debian's
  ``nlohmann-json3-dev`` fetched into ``build/json-headers/`` by ``fetch_ort_headers.sh --json``).

Unless ``--no-ops``, it also builds the custom-op library ``build/custom_ops/liblrexport_ops.so``
(:func:`lrexport.ortops.library_path`), which ``lrexport_generate`` loads by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lrexport import ortops
from lrexport.errors import LrexportError

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / "samples" / "cpp"
BUILD_DIR = REPO_ROOT / "build" / "samples-cpp"
JSON_HEADERS_DIR = REPO_ROOT / "build" / "json-headers"
PROGRAM = "lrexport_generate"

__all__ = ["BUILD_DIR", "build", "json_include_dir", "missing_tools", "ort_library"]


def missing_tools() -> str | None:
    """Why the sample cannot be built here (no CMake, no C++ compiler), or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed (Debian: apt-get install cmake)"
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or not shutil.which(cxx):
        return "no C++ compiler found (c++, g++ or clang++; Debian: apt-get install g++)"
    return None


def ort_library() -> Path:
    """The ONNX Runtime shared library inside the installed onnxruntime wheel (or ``$ORT_LIB``)."""
    env = os.environ.get("ORT_LIB")
    if env:
        if not Path(env).is_file():
            raise LrexportError(f"ORT_LIB={env} is not a file")
        return Path(env)
    try:
        import onnxruntime
    except ImportError as e:
        raise LrexportError("the onnxruntime Python package is not installed; install it or set ORT_LIB") from e
    capi = Path(onnxruntime.__file__).resolve().parent / "capi"
    libs = sorted(p for p in capi.glob("libonnxruntime.so*") if p.is_file() and not p.is_symlink())
    if not libs:
        raise LrexportError(f"no libonnxruntime.so.* in {capi} (onnxruntime {onnxruntime.__version__}); set ORT_LIB")
    return max(libs, key=lambda p: len(p.name))  # libonnxruntime.so.1.32.0 rather than a bare .so


def json_include_dir() -> Path:
    """The folder holding ``nlohmann/json.hpp``: ``$JSON_INCLUDE_DIR``, a system copy, or Debian's
    ``nlohmann-json3-dev`` fetched with ``fetch_ort_headers.sh --json`` into ``build/json-headers``."""
    env = os.environ.get("JSON_INCLUDE_DIR")
    if env:
        if not (Path(env) / "nlohmann" / "json.hpp").is_file():
            raise LrexportError(f"JSON_INCLUDE_DIR={env} holds no nlohmann/json.hpp")
        return Path(env)
    for system in (Path("/usr/include"), Path("/usr/local/include")):
        if (system / "nlohmann" / "json.hpp").is_file():
            return system
    res = subprocess.run(["bash", str(ortops.FETCH_SCRIPT), "--json", str(JSON_HEADERS_DIR)], capture_output=True,
                         text=True, check=False)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not (Path(lines[-1]) / "nlohmann" / "json.hpp").is_file():
        raise LrexportError("could not fetch nlohmann/json (Debian nlohmann-json3-dev); set JSON_INCLUDE_DIR to a "
                            f"folder holding nlohmann/json.hpp instead.\n{_tail(res.stderr)}")
    return Path(lines[-1])


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LrexportError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{_tail(res.stdout + res.stderr)}")


def build(build_dir: Path | None = None, jobs: int = 2, ops: bool = True) -> Path:
    """Configure and build ``lrexport_generate``; return its path (and build the custom-op library
    too when ``ops``). Raises :class:`LrexportError` with the end of the failing command's output."""
    reason = missing_tools()
    if reason:
        raise LrexportError(f"cannot build the C++ sample: {reason}")
    build_dir = Path(build_dir) if build_dir is not None else BUILD_DIR
    if ops:
        ortops.library_path()  # builds build/custom_ops/liblrexport_ops.so when missing or stale
    with ortops._lock(REPO_ROOT / "build" / ".samples-cpp.lock"):
        configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DORT_LIB={ort_library()}", f"-DORT_INCLUDE_DIR={ortops.ort_include_dir()}",
                     f"-DJSON_INCLUDE_DIR={json_include_dir()}"]
        _run(configure, "CMake configure of the C++ sample")
        _run(["cmake", "--build", str(build_dir), "-j", str(max(1, jobs))], "build of the C++ sample")
    program = build_dir / PROGRAM
    if not program.is_file():
        raise LrexportError(f"the build finished but {program} is missing")
    return program


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python samples/build_cpp.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", type=Path, default=BUILD_DIR, help=f"default {BUILD_DIR}")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--no-ops", action="store_true", help="do not build liblrexport_ops.so")
    args = ap.parse_args(argv)
    try:
        print(build(args.build_dir, jobs=args.jobs, ops=not args.no_ops))
    except LrexportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
