"""What this CPU offers the oneDNN kernels (no paddle): read at run time, never assumed.

The project's machines differ: AMD Zen 3 (AVX2 + FMA only), Zen 4 (AVX-512 with VNNI and
AVX512_BF16), Intel Xeons with AMX. What matters to the precisions:

- bf16 runs real bf16 kernels only with AVX512_BF16 or AMX-BF16; elsewhere Paddle's
  `enable_mkldnn_bfloat16()` silently runs fp32, so bf16 is refused there instead.
- int8 runs anywhere oneDNN runs; VNNI (AVX512_VNNI or AVX-VNNI) or AMX-INT8 makes it fast and
  free of int16 saturation, without it (AVX2) it still runs, slower.
- `ONEDNN_MAX_CPU_ISA` (e.g. `AVX2`) caps what oneDNN uses, so a Zen 4 or a Xeon can behave as
  a Zen 3; the cap is applied here too.

`CpuFeatures.detect(cpuinfo, environ)` takes both as arguments so tests can inject any CPU.
`onednn_isa` is oneDNN's own report of the ISA it dispatches to (its `ONEDNN_VERBOSE` info
line), probed once in a subprocess and cached per CPU, cap and paddle version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.paddle_env import cpu_info

# oneDNN's ISA levels, weakest first (the names ONEDNN_MAX_CPU_ISA takes).
ISA_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
              "AVX512_CORE_AMX")
_ISA_ALIASES = {"ALL": "AVX512_CORE_AMX", "DEFAULT": "AVX512_CORE_AMX", "AVX2_VNNI_2": "AVX2_VNNI",
                "AVX512_CORE_FP16": "AVX512_CORE_BF16", "AVX10_1_512": "AVX512_CORE_BF16",
                "AVX10_1_512_AMX": "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16": "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16": "AVX512_CORE_AMX"}


def _level(name: str) -> int:
    return ISA_LEVELS.index(name)


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: tuple[str, ...]  # the ISA flags of /proc/cpuinfo that matter here
    isa_cap: str | None  # ONEDNN_MAX_CPU_ISA as set (None: not set)
    isa: str  # the ISA level oneDNN can use: the CPU's best, under the cap

    @classmethod
    def detect(cls, cpuinfo: dict | None = None, environ: dict | None = None) -> CpuFeatures:
        """From `pipeline.engine.paddle_env.cpu_info()`'s dict and the environment (both
        injectable)."""
        info = cpu_info() if cpuinfo is None else cpuinfo
        env = os.environ if environ is None else environ
        flags = set(info.get("flags", ()))
        if "amx_bf16" in flags and "avx512_bf16" in flags:
            best = "AVX512_CORE_AMX"
        elif "avx512_bf16" in flags:
            best = "AVX512_CORE_BF16"
        elif "avx512_vnni" in flags:
            best = "AVX512_CORE_VNNI"
        elif "avx512f" in flags:
            best = "AVX512_CORE"
        elif "avx_vnni" in flags:
            best = "AVX2_VNNI"
        elif "avx2" in flags:
            best = "AVX2"
        else:
            best = "SSE41"
        cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or None
        isa = best
        if cap:
            capped = _ISA_ALIASES.get(cap.upper(), cap.upper())
            if capped in ISA_LEVELS and _level(capped) < _level(best):
                isa = capped
        return cls(model=str(info.get("model", "")), flags=tuple(sorted(flags)), isa_cap=cap, isa=isa)

    @property
    def bf16(self) -> bool:
        """Native bf16 kernels (AVX512_BF16 or AMX) are available to oneDNN."""
        return _level(self.isa) >= _level("AVX512_CORE_BF16")

    @property
    def vnni(self) -> bool:
        """int8 dot products without int16 saturation (VNNI or AMX)."""
        return self.isa in ("AVX2_VNNI",) or _level(self.isa) >= _level("AVX512_CORE_VNNI")

    def to_dict(self) -> dict:
        return {"model": self.model, "flags": list(self.flags), "onednn_max_cpu_isa": self.isa_cap,
                "isa": self.isa, "bf16": self.bf16, "vnni": self.vnni}


# ----------------------------------------------------------------------------- oneDNN's own report

_PROBE = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
from pipeline.engine.predictor import PredictorSettings, build_config, paddle_infer
from pipeline.engine.modeldir import load_model_info
info = load_model_info({model!r})
p = paddle_infer.create_predictor(build_config(info, PredictorSettings()))
ids = np.ones((1, 4), np.int64)
arrays = (ids, ids * 0, np.ones((1, 4), np.float32), np.arange(4, dtype=np.int64)[None])
for name, a in zip(p.get_input_names(), arrays):
    p.get_input_handle(name).copy_from_cpu(a)
p.run()
"""


def _probe_cache_key(cpu: CpuFeatures) -> str:
    try:
        from importlib.metadata import version

        paddle = version("paddlepaddle")
    except Exception:  # noqa: BLE001 - any install problem just means no cache reuse
        paddle = "?"
    return hashlib.sha256(json.dumps([cpu.model, cpu.flags, cpu.isa_cap, paddle]).encode()).hexdigest()[:16]


def start_isa_probe(model_dir: Path) -> subprocess.Popen | None:
    """oneDNN's ISA report, asked of a subprocess that runs `model_dir` once with
    ONEDNN_VERBOSE=1 (it runs while the job starts up; `finish_isa_probe` collects it)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "GLOG_minloglevel": "3"}
    root = str(Path(__file__).resolve().parents[2])
    try:
        return subprocess.Popen([sys.executable, "-c", _PROBE.format(root=root, model=str(model_dir))],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    except OSError:
        return None


def finish_isa_probe(proc: subprocess.Popen | None, timeout: float = 60.0) -> str | None:
    """The `isa:` text of oneDNN's info line, or None when the probe failed."""
    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    for line in out.splitlines():
        if line.startswith("onednn_verbose,info,cpu,isa:"):
            return line.split("isa:", 1)[1].strip()
    return None


class OnednnIsa:
    """oneDNN's ISA report for this CPU and cap, from `cache` when it has it (one probe per
    machine kind and paddle version); otherwise probed in a subprocess started here, which runs
    while the job starts up, and collected by `result()`."""

    def __init__(self, model_dir: Path, cpu: CpuFeatures, cache: Path | None):
        self.entry = Path(cache) / f"onednn-isa-{_probe_cache_key(cpu)}.json" if cache else None
        self.cpu = cpu
        self.cached: str | None = None
        self.proc = None
        if self.entry is not None and self.entry.exists():
            try:
                self.cached = json.loads(self.entry.read_text())["isa"]
            except (OSError, ValueError, KeyError):
                self.cached = None
        if self.cached is None:
            self.proc = start_isa_probe(model_dir)

    def result(self) -> str | None:
        if self.cached is not None or self.proc is None:
            return self.cached
        isa = finish_isa_probe(self.proc)
        self.proc = None
        if isa and self.entry is not None:
            try:
                self.entry.parent.mkdir(parents=True, exist_ok=True)
                self.entry.write_text(json.dumps({"isa": isa, "cpu": self.cpu.to_dict()}))
            except OSError:
                pass
        self.cached = isa
        return isa
