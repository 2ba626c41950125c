"""Compile the sparse kernels on first use, cache the shared library, load it with :mod:`ctypes`.

Why plain C through ``ctypes`` and not ``torch.utils.cpp_extension``: the kernels need nothing from torch but
pointers, so they compile in under a second with the system C compiler (``cc``), where a C++ extension that
includes the torch headers takes about a minute on two cores and needs ninja. The library is built with
``-O3 -march=native -fopenmp`` into a cache folder keyed by the source, the compiler, its flags and the CPU's
feature flags, so a cached build never runs on a CPU it was not built for. It links ``libgomp.so.1``, the OpenMP
runtime that torch itself loads, so both share one thread pool.

No compiler, or a failed build: :func:`load_kernels` returns ``None`` and :func:`kernels_available` is False; the
callers then compute dense and say so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["kernel_cache_dir", "kernels_available", "load_kernels", "build_error"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None

_i64, _i32, _ptr, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
_RETURNS_INT = {"er_border_zero"}
# fmt: off
_SIGNATURES = {
    "er_bn_train": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _f64, _f64, _ptr, _ptr, _ptr, _ptr, _i32],
    "er_border_zero": [_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64],
    "er_dense_rows": [_i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i32, _i32],
    "er_gather": [_ptr, _ptr, _i64, _ptr, _i32],
    "er_offsets": [_i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i32],
    "er_spmm": [_i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i32, _i32],
    "er_spmm_blocked": [_i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i32, _i32],
    "er_spmm_scatter": [_i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i32],
    "er_sddmm": [_i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i32],
    "er_pack": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_pack_bl": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_maxpool_bl": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_maxpool_bl_grad": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_unpack_out": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_unpack_grad": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
    "er_unpack_grad_bl": [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32],
}
# fmt: on


def kernel_cache_dir() -> Path:
    """Where built kernels are kept: ``$ER_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/er_lightning``, else
    ``~/.cache/er_lightning``."""
    root = os.environ.get("ER_LIGHTNING_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "er_lightning" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), _cpu_flags().encode()])
    ).hexdigest()[:20]
    target = kernel_cache_dir() / f"er_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: concurrent builds (DDP ranks) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("er_lightning: built sparse kernels into %s", target)
    return target


def load_kernels() -> ctypes.CDLL | None:
    """The kernel library, built on first use; ``None`` (with :func:`build_error` set) when it cannot be built.

    Set ``ER_LIGHTNING_NO_KERNELS=1`` to disable the kernels (every layer then computes dense).
    """
    global _lib, _tried, _error
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("ER_LIGHTNING_NO_KERNELS"):
            _error = "disabled by ER_LIGHTNING_NO_KERNELS"
            return None
        cc = _compiler()
        if cc is None:
            _error = "no C compiler found (looked for $CC, cc, gcc, clang)"
            return None
        try:
            path = _build(cc)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as exc:
            _error = f"building the sparse kernels failed: {exc}"
            return None
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int if name in _RETURNS_INT else None
        _lib = lib
        return _lib


def kernels_available() -> bool:
    """True when the sparse kernels are built and loaded (building them on first call)."""
    return load_kernels() is not None


def build_error() -> str | None:
    """Why the kernels are unavailable, or ``None``."""
    load_kernels()
    return _error
