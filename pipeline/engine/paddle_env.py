"""How the predictors import paddle: what this machine's CPU is (read at run time), the
math-library environment that follows from it, set before paddle's first import, and Python's
SIGTERM handler kept across that import.

- MKL picks slow generic kernels on AMD CPUs unless `MKL_DEBUG_CPU_TYPE=5` makes it use its
  AVX2 ones (measured on Zen 3: 1.3x on the oneDNN encoder predictor, 2x on plain MKL paths). On
  Intel CPUs the same setting only forces AVX2 kernels where AVX-512 ones exist: the decoder
  step (MKL matmuls) was about 20% slower with it on an AVX-512 Xeon. The encoder's predictor
  runs on oneDNN, whose kernels do not depend on it (same outputs and speed either way there).
- `GLOG_minloglevel=2` keeps Paddle's C++ pass log off the console.
- `import zlib` first: paddle 2.6 breaks Python's zlib if it is imported before it.
- SIGTERM: paddle's first import installs glog's failure handler for it, which prints a stack
  dump and aborts the process, replacing whatever Python had there (the CLI's cancel on
  SIGTERM, or the default). The handler Python had is put back right after the import.
"""

from __future__ import annotations

import os
import signal
import threading
import zlib  # noqa: F401 - see the module docstring

_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{'vendor': 'AuthenticAMD' | 'GenuineIntel' | '', 'model': str, 'flags': [the ISA flags above present]}."""
    vendor = model = ""
    flags: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value
                elif key == "model name" and not model:
                    model = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if vendor and model and flags:
                    break
    except OSError:
        pass
    return {"vendor": vendor, "model": model, "flags": [f for f in _FLAGS if f in flags]}


def set_math_library_env() -> None:
    """Set (without overriding the user's) the environment the predictors need; see the module doc."""
    if cpu_info()["vendor"] == "AuthenticAMD":
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("GLOG_minloglevel", "2")


def import_inference():
    """`paddle.inference`, imported with the environment above and the SIGTERM handler kept."""
    set_math_library_env()
    previous = signal.getsignal(signal.SIGTERM)
    from paddle import inference

    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
    return inference
