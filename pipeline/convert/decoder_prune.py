"""Vocabulary pruning of a generation model (decoder): `prune-vocab DECODER_DIR --data FILES --out DIR`.

For generation the output head is a large part of every decode step: SmolLM2-135M's tied head
is 49,152 x 576 (28M of its 135M parameters), multiplied for every generated token and followed
by a softmax over the whole vocabulary. A model whose embedding and head hold only the tokens
the data needs computes the same logits on those tokens, with a smaller head.

What is kept (`choose_kept_ids`), learned from the *learning* half of the rows:
- every token of the prompts as the model sees them (chat template rendered, BOS as the model
  adds it: `PromptEncoder`, as `generate` tokenizes), the special markers included;
- every token of the references, tokenized alone and after a space (byte-level BPE spells a
  word differently at the start of a text and after a space);
- every token the unpruned model generates greedily on a sample of those rows
  (`outputs_sample`);
- always: the tokenizer's added/special tokens (EOS, pad, BOS, chat markers), and the 256
  byte-level symbols (the ones the vocabulary has): with them every string stays spellable, so
  a prompt token outside the kept set can be spelled out instead of dropped (counted; see
  `engine/prompt_text.py`) and the model can still write any text; optionally the first
  `keep_top` ids (BPE ids follow merge order, roughly frequency).

Rows are split by sha1(id) into a learning half and a held-out half; the held-out rows are the
generation gate's sample (`convert/generation_gate.py`: ROUGE-L and BLEU against the references
may lose at most 1% against the unpruned fp32 model, identical share reported), so the gate
measures rows the kept set was not learned from.

The pruned model is rebuilt from the source directory's exported parameters (`decoder.pdiparams`
read through the prefill program; the parameters' generated names are matched to the module's
by kind and creation order, every shape checked), with the embedding rows (and an untied head's
columns) cut to the kept ids, re-exported as prefill and decode programs, and checked before the
gate: the exported programs against the dynamic-graph pruned model (the converter's check,
1e-4), and the pruned programs' logits against the full model's logits restricted to the kept
ids on a probe of kept ids (1e-4). `vocab_map.npy` (the full id of every model row) is read by
`DecoderModelInfo`; prompts are mapped to rows before the model and generated rows back to full
ids after it, so every output holds full-vocabulary ids.

A failing gate leaves nothing written (`PruneGateFailed`) unless `force`, which writes the model
with `gates.pruning.passed` false and `forced` true. paddle is imported only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.convert.generation_gate import (
    DEFAULT_MAX_LOSS_RATE,
    GateCandidate,
    GateDecoding,
    GateRun,
    gate_record,
    generate_outputs,
    record_gate,
    run_generation_gate,
)
from pipeline.engine.decoder_io import PARAMS_FILE, PREFILL_PROGRAM
from pipeline.engine.decoder_modeldir import TOKENIZER_FILE, DecoderModelInfo
from pipeline.engine.modeldir import MODEL_JSON, load_model_info, sha256_file, staged_dir
from pipeline.engine.vocab_map import VOCAB_MAP_FILE, vocab_map_bytes
from pipeline.io.reader import ColumnMap, list_input_files

PRUNING_GATE = "pruning"  # the name of the gate record in model.json "gates"
DEFAULT_OUTPUTS_SAMPLE = 64
RESTRICTED_LOGITS_ATOL = 1e-4  # pruned logits vs the full model's on the kept ids (same kernels, other shapes)
_NO_LIMIT = 1 << 30  # pruning reads whole prompts


class PruneGateFailed(ConversionError):
    """The pruned model failed its generation gate and was not written."""

    def __init__(self, message: str, gate: GateRun):
        super().__init__(message)
        self.gate = gate


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: Optional[str]
    messages: Optional[list]
    references: tuple[str, ...]

    def to_json(self) -> dict:
        d: dict = {"id": self.id}
        if self.messages is not None:
            d["messages"] = self.messages
        else:
            d["prompt"] = self.prompt
        if self.references:
            d["reference"] = list(self.references)
        return d


@dataclass(frozen=True)
class DecoderPruneResult:
    path: Path
    ids_kept: int
    source_vocab_size: int
    learn_rows: int
    held_out_rows: int
    gate: GateRun


def read_prompt_rows(files: Sequence[Path], columns: ColumnMap) -> list[PromptRow]:
    """The accepted rows of generation input files, in input order (rejected rows are left out,
    as `generate` leaves them out)."""
    from pipeline.io.prompts import PromptReader

    rows = []
    for chunk, _rejects in PromptReader(files, columns).chunks():
        if chunk is None:
            continue
        for i in range(len(chunk)):
            rows.append(PromptRow(chunk.id[i], None if chunk.prompt is None else chunk.prompt[i],
                                  None if chunk.messages is None else chunk.messages[i], tuple(chunk.reference[i])))
    return rows


def held_out(row_id: str) -> bool:
    """The held-out half (the gate's rows): decided by sha1(id), the same on every machine."""
    return hashlib.sha1(row_id.encode("utf-8")).digest()[0] & 1 == 1


def write_rows(path: Path, rows: Sequence[PromptRow]) -> Path:
    path.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def prompt_token_ids(info: DecoderModelInfo, rows: Sequence[PromptRow], chat: bool) -> list[list[int]]:
    """Full-vocabulary ids of the prompts as `generate` tokenizes them (whole, untruncated)."""
    from pipeline.engine.prompt_text import PromptEncoderSpec
    from pipeline.engine.text import TokenizeRequest

    spec = PromptEncoderSpec(str(info.tokenizer_file), info.chat_template, _NO_LIMIT, "truncate", chat,
                             info.add_bos_token, info.special.bos_token_id, info.special.eos_token_ids[0])
    enc = spec.build()
    chats = [r.messages for r in rows if r.messages is not None]
    plain = [r.prompt for r in rows if r.messages is None]
    out = []
    for kind, items in (("messages", chats), ("prompts", plain)):
        if items:
            res = enc.run(TokenizeRequest(kind, 0, items))
            if res.failed:
                i, why = next(iter(res.failed.items()))
                raise ConversionError(f"{len(res.failed)} prompts do not tokenize (first: {why})")
            out += res.ids
    return out


def reference_token_ids(tokenizer, rows: Sequence[PromptRow]) -> list[list[int]]:
    texts = [t for r in rows for ref in r.references for t in (ref, " " + ref)]
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def always_kept_ids(info: DecoderModelInfo, tokenizer) -> list[int]:
    """Added/special tokens, the model's special ids, and the byte-level symbols the vocab has."""
    from tokenizers.pre_tokenizers import ByteLevel

    sp = info.special
    ids = set(tokenizer.get_added_tokens_decoder().keys()) | set(sp.eos_token_ids) | {sp.pad_token_id}
    ids |= {i for i in (sp.bos_token_id, sp.unk_token_id) if i is not None}
    ids |= {i for i in (tokenizer.token_to_id(ch) for ch in ByteLevel.alphabet()) if i is not None}
    return sorted(int(i) for i in ids)


def choose_kept_ids(vocab_size: int, seen: Sequence[Sequence[int]], always: Sequence[int],
                    keep_top: int = 0) -> np.ndarray:
    """The ids to keep, ascending: every id in `seen`, `always`, and the first `keep_top`."""
    keep = np.zeros(vocab_size, dtype=bool)
    flat = np.fromiter((t for s in seen for t in s), dtype=np.int64)
    keep[flat[(flat >= 0) & (flat < vocab_size)]] = True
    keep[np.asarray(list(always), dtype=np.int64)] = True
    keep[: max(0, keep_top)] = True
    return np.flatnonzero(keep)


# ----------------------------------------------------------------------------- weights


def _kind_and_rank(name: str) -> tuple[str, int, str]:
    """'linear_462.w_0' -> ('linear', 462, 'w_0'): paddle's generated parameter names."""
    m = re.fullmatch(r"(.+)_(\d+)\.(\w+)", name)
    assert m, f"unexpected parameter name {name!r}"
    return m.group(1), int(m.group(2)), m.group(3)


def read_program_params(folder: Path) -> dict[str, np.ndarray]:
    """The persistable variables of a decoder directory's prefill program, by their saved names."""
    import paddle

    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            program, _, _ = paddle.static.load_inference_model(
                str(folder), paddle.static.Executor(paddle.CPUPlace()), model_filename=PREFILL_PROGRAM,
                params_filename=PARAMS_FILE)
            return {v.name: np.array(scope.find_var(v.name).get_tensor())
                    for v in program.list_vars() if v.persistable and v.name not in ("feed", "fetch")}
    finally:
        paddle.disable_static()


def match_parameters(model, saved: dict[str, np.ndarray]) -> dict[str, str]:
    """{structured name of `model`: saved name}. Paddle names a parameter by the kind of layer
    that made it and a process-wide counter (`linear_462.w_0`), so the saved names of a module
    built in another process differ from `model`'s by an offset per kind; within a kind the
    order of creation is the same. Non-parameter persistables (the rotary buffer) are left out."""
    def by_kind(names):
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for n in names:
            kind, rank, suffix = _kind_and_rank(n)
            groups.setdefault((kind, suffix), []).append((rank, n))
        return {k: [n for _, n in sorted(v)] for k, v in groups.items()}

    ours = {p.name: structured for structured, p in model.named_parameters()}
    mine, theirs = by_kind(ours), by_kind(n for n in saved if not n.startswith("eager_tmp"))
    if set(mine) != set(theirs) or any(len(mine[k]) != len(theirs[k]) for k in mine):
        raise ConversionError(f"the exported parameters ({ {k: len(v) for k, v in theirs.items()} }) do not match "
                              f"the decoder module's ({ {k: len(v) for k, v in mine.items()} })")
    return {ours[a]: b for k in mine for a, b in zip(mine[k], theirs[k])}


def pruned_weights(model, saved: dict[str, np.ndarray], kept: np.ndarray, tied: bool) -> dict[str, np.ndarray]:
    """The source's parameters under `model`'s names, the embedding rows (and an untied head's
    columns, [in, out]) cut to `kept`; every other shape must equal the module's."""
    names = match_parameters(model, saved)
    out = {}
    for structured, saved_name in names.items():
        w = saved[saved_name]
        if structured == "embed_tokens.weight":
            w = w[kept]
        elif structured == "lm_head.weight" and not tied:
            w = w[:, kept]
        out[structured] = np.ascontiguousarray(w)
    return out


# ----------------------------------------------------------------------------- checks


def check_restricted_logits(full_dir: Path, pruned_dir: Path, kept: np.ndarray, threads: int = 1) -> float:
    """The pruned programs' logits (prefill and PROBE_STEPS decode steps of a left-padded probe
    of kept ids) against the full model's logits at the kept ids; returns the largest
    difference, ConversionError at RESTRICTED_LOGITS_ATOL or more."""
    from pipeline.convert.decoder_convert import PROBE_STEPS, probe_batch
    from pipeline.engine.decoder_predictor import DecoderPredictor

    rows, mask, pos = probe_batch(len(kept))
    full_ids = kept[rows]
    n = rows.shape[1] + PROBE_STEPS
    full = DecoderPredictor(full_dir, rows.shape[0], n, threads=threads)
    pruned = DecoderPredictor(pruned_dir, rows.shape[0], n, threads=threads)
    want = full.prefill(full_ids, pos, mask.astype(np.float32))[:, kept]
    got = pruned.prefill(rows, pos, mask.astype(np.float32))
    errs = [float(np.abs(got - want).max())]
    next_pos = pos[:, -1:] + 1
    for _ in range(PROBE_STEPS):
        tok = got.argmax(-1)[:, None].astype(np.int64)  # pruned rows; the full model gets their ids
        mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
        want = full.step(kept[tok], next_pos, mask.astype(np.float32))[:, kept]
        got = pruned.step(tok, next_pos, mask.astype(np.float32))
        errs.append(float(np.abs(got - want).max()))
        next_pos = next_pos + 1
    err = max(errs)
    if not err < RESTRICTED_LOGITS_ATOL:
        raise ConversionError(f"the pruned model's logits differ from the full model's at the kept ids by {err:.3g} "
                              f"(limit {RESTRICTED_LOGITS_ATOL}): the rows were not cut consistently")
    return err


# ----------------------------------------------------------------------------- the command


def prune_decoder_vocab(model_dir: str | Path, data: Sequence[str | Path], out: str | Path, *,
                        outputs_sample: int = DEFAULT_OUTPUTS_SAMPLE, keep_top: int = 0, force: bool = False,
                        columns: ColumnMap = ColumnMap(), name: Optional[str] = None,
                        max_loss_rate: float = DEFAULT_MAX_LOSS_RATE, max_new_tokens: int = 64, chat: bool = False,
                        threads: Optional[int] = None, cache_root: Optional[Path] = None) -> DecoderPruneResult:
    """Write the vocabulary-pruned copy of generation model `model_dir` for `data` into `out`
    (see the module doc); the gate decodes greedily with `max_new_tokens` (generate's default)."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == model_dir.resolve():
        raise ConversionError(f"--out {out} is the source model itself; choose another directory")
    if keep_top < 0 or outputs_sample < 0:
        raise ConversionError(f"--keep-top and --outputs-sample must be >= 0, got {keep_top}, {outputs_sample}")
    info = load_model_info(model_dir)
    assert isinstance(info, DecoderModelInfo)
    if info.is_pruned:
        raise ConversionError(f"{model_dir} is already pruned; prune its source model "
                              f"({info.meta['pruning']['source_path']}) instead")
    files = list_input_files(data)
    rows = read_prompt_rows(files, columns)
    learn = [r for r in rows if not held_out(r.id)]
    gate_rows = [r for r in rows if held_out(r.id)]
    if not learn or not gate_rows:
        raise ConversionError(f"{len(rows)} usable rows split into {len(learn)} to learn the vocabulary from and "
                              f"{len(gate_rows)} to gate on (by sha1 of the id): both halves need rows; give more")
    if not any(r.references for r in gate_rows):
        raise ConversionError("the held-out rows have no references: the generation gate needs a reference column")

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(info.tokenizer_file))
    decoding = GateDecoding(max_new_tokens=max_new_tokens, chat=chat)
    with tempfile.TemporaryDirectory(prefix="prune-vocab-") as tmp:
        tmp = Path(tmp)
        held_file = write_rows(tmp / "held_out.jsonl", gate_rows)
        seen = prompt_token_ids(info, learn, chat) + reference_token_ids(tokenizer, learn)
        sample = learn[:outputs_sample]
        if sample:
            seen += list(generate_outputs(model_dir, [write_rows(tmp / "sample.jsonl", sample)], decoding,
                                          threads=threads).token_ids)
        kept = choose_kept_ids(info.vocab_size, seen, always_kept_ids(info, tokenizer), keep_top)
        result = _write_pruned(info, kept, out, force=force, name=name, files=files, keep_top=keep_top,
                               outputs_sample=len(sample), learn_rows=len(learn), held_file=held_file,
                               held_rows=len(gate_rows), decoding=decoding, max_loss_rate=max_loss_rate,
                               threads=threads, cache_root=cache_root)
    return result


def _write_pruned(info: DecoderModelInfo, kept: np.ndarray, out: Path, *, force, name, files, keep_top,
                  outputs_sample, learn_rows, held_file, held_rows, decoding, max_loss_rate, threads,
                  cache_root) -> DecoderPruneResult:
    import paddle

    from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM
    from pipeline.convert.decoder_convert import check_programs
    from pipeline.convert.decoder_export import write_decoder_programs

    paddle.set_device("cpu")
    arch = info.architecture
    row = {int(f): r for r, f in enumerate(kept.tolist())}
    mapped = lambda i: None if i is None else row.get(int(i))  # noqa: E731
    cfg = DecoderConfig.from_dict({**arch, "vocab_size": int(len(kept)), "bos_token_id": mapped(arch.get("bos_token_id")),
                                   "eos_token_id": mapped(arch.get("eos_token_id")),
                                   "pad_token_id": mapped(arch.get("pad_token_id"))})
    saved = read_program_params(info.path)
    with paddle.utils.unique_name.guard():
        model = DecoderForCausalLM(cfg)
    try:
        model.load_weights(pruned_weights(model, saved, kept, cfg.tie_word_embeddings))
    except AssertionError as e:
        raise ConversionError(f"{info.params_file}: {e}") from e
    del saved
    model.eval()
    map_bytes = vocab_map_bytes(kept)
    with staged_dir(out) as stage:
        write_decoder_programs(model, stage.path)
        shutil.copyfile(info.tokenizer_file, stage.path / TOKENIZER_FILE)
        (stage.path / VOCAB_MAP_FILE).write_bytes(map_bytes)
        export_err = check_programs(model, stage.path)
        del model
        meta = {k: v for k, v in info.meta.items() if k not in ("gates", "validation", "pruning")}
        meta.update({
            "name": name or f"{info.name}-pruned",
            "architecture": cfg.to_dict(),
            "params_sha256": sha256_file(stage.path / PARAMS_FILE),
            "tokenizer_sha256": sha256_file(stage.path / TOKENIZER_FILE),
            "converted_by": f"pipeline {__version__}, paddle {paddle.__version__}",
            "pruning": {
                "source_path": str(info.path.resolve()), "source_params_sha256": info.checksum,
                "source_vocab_size": int(info.vocab_size), "ids_kept": int(len(kept)), "keep_top": keep_top,
                "outputs_sample": outputs_sample, "learn_rows": learn_rows, "held_out_rows": held_rows,
                "split": "sha1(id)[0] & 1: 1 = held out (the gate's rows), 0 = learned from",
                "data": [{"file": str(f.resolve()), "sha256": sha256_file(f)} for f in files],
                "map_file": VOCAB_MAP_FILE, "map_sha256": hashlib.sha256(map_bytes).hexdigest(),
            },
            "validation": {"max_abs_logit_diff": export_err},
        })
        (stage.path / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        restricted = check_restricted_logits(info.path, stage.path, kept)
        meta["validation"]["max_abs_restricted_logit_diff_vs_full"] = restricted
        meta["validation"]["restricted_limit"] = RESTRICTED_LOGITS_ATOL
        (stage.path / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        load_model_info(stage.path)  # reads back, the vocab map checked

        gate = run_generation_gate(info.path, GateCandidate(stage.path), [held_file], decoding, max_loss_rate,
                                   cache_root, threads)
        unknown = int(gate.candidate.report.get("tokens", {}).get("unknown_tokens", 0))
        record = gate_record(gate.result, base_dir=info.path, data=[held_file.name], decoding=decoding,
                             forced=force, extra={"held_out_rows": held_rows, "unknown_prompt_tokens": unknown,
                                                  "baseline_cached": gate.baseline_cached})
        record_gate(stage.path, PRUNING_GATE, record)
        if not gate.result.passed and not force:
            from pipeline.convert.generation_gate import format_generation_gate

            raise PruneGateFailed(f"the pruned model fails the generation gate, so {out} was not written; keep more "
                                  f"tokens (--keep-top, --outputs-sample) or pass --force to write it marked failing\n"
                                  f"{format_generation_gate(gate.result, 'pruned')}", gate)
    return DecoderPruneResult(out, int(len(kept)), int(info.vocab_size), learn_rows, held_rows, gate)
