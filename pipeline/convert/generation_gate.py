"""The quality gate of an optimised generation model (vocabulary pruning, bf16, int8, later fp16)
against the fp32 unpruned model, on a sample with references (no paddle at module level).

The rule (issue 16, the competition's metric-loss rule): ROUGE-L and BLEU of the best candidate
against the references may each lose at most `max_loss_rate` (1%), |m_base - m_opt| / m_base,
and the share of rows whose greedy output is identical to the base model's is reported (token
for token when token ids are given, else text).

Two layers:

- `compare_generations(base_texts, candidate_texts, references, ...)`: the pure comparison of
  outputs that exist (`pipeline.tasks.text_metrics.generation_metrics`: sacrebleu corpus BLEU,
  rouge-score mean ROUGE-L F1), returning a frozen `GenerationGateResult`.
- `run_generation_gate(base_dir, candidate, data, decoding)`: generates with the base model and
  the candidate exactly as `generate` does (the same job, `pipeline.job.run.run`: chat template,
  prompt limit, greedy decoding, the same `max_new_tokens`) and compares them. The candidate is
  a `GateCandidate` (a model directory and the precision to run it at) or any callable
  `(files, decoding) -> GeneratedOutputs` (a Generator factory of one's own, e.g. in tests).

The base model's outputs are cached in `CACHE/generation-gate/<key>.json`, keyed by the base
model's params checksum, the data files' sha256 and the decoding settings (`baseline_key`), so
every optimisation gated on the same sample reuses one baseline; a missing or unreadable entry
is rebuilt. `record_gate` writes the result into a model directory's model.json `"gates"`,
which `DecoderModelInfo.gates` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.io.reader import ColumnMap

DEFAULT_MAX_LOSS_RATE = 0.01
GATE_METRICS = ("rouge_l", "bleu")
BASELINE_CACHE = "generation-gate"
BASELINE_FORMAT = 1  # bump when the cached record's layout changes


def loss_rate(base: float, candidate: float) -> float:
    """|base - candidate| / |base|; 0 when both are 0, inf when only the base is 0."""
    if base == 0:
        return 0.0 if candidate == 0 else float("inf")
    return abs(base - candidate) / abs(base)


@dataclass(frozen=True)
class GenerationGateResult:
    rows: int  # rows compared (those with a reference count in the metrics)
    rows_with_reference: int
    base: dict  # metric -> value for the base model ("rouge_l" 0-1, "bleu" 0-100, "chrf" 0-100)
    candidate: dict
    loss_rate: dict  # metric in GATE_METRICS -> |base - candidate| / base
    identical_rows: int
    identical_share: float  # identical_rows / rows
    identical_by: str  # 'tokens' | 'text'
    max_loss_rate: float
    passed: bool

    def to_json(self) -> dict:
        """The record model.json "gates" holds (plain JSON types; inf as a string)."""
        d = asdict(self)
        d["loss_rate"] = {k: (v if v != float("inf") else "inf") for k, v in self.loss_rate.items()}
        return d


def compare_generations(base_texts: Sequence[str], candidate_texts: Sequence[str],
                        references: Sequence[Sequence[str]], *, base_tokens: Optional[Sequence[Sequence[int]]] = None,
                        candidate_tokens: Optional[Sequence[Sequence[int]]] = None,
                        max_loss_rate: float = DEFAULT_MAX_LOSS_RATE) -> GenerationGateResult:
    """Compare the candidate's outputs with the base model's, row by row (row i of every list is
    the same prompt). Passes when ROUGE-L and BLEU each lose at most `max_loss_rate`."""
    from pipeline.tasks.text_metrics import generation_metrics

    n = len(base_texts)
    assert len(candidate_texts) == n and len(references) == n, (
        f"{n} base texts, {len(candidate_texts)} candidate texts and {len(references)} reference lists: "
        f"every list needs one entry per prompt")
    assert (base_tokens is None) == (candidate_tokens is None), "give the token ids of both models, or of neither"
    assert 0 <= max_loss_rate, f"max_loss_rate must be >= 0, got {max_loss_rate}"
    if base_tokens is not None:
        assert len(base_tokens) == len(candidate_tokens) == n, (
            f"token lists: {len(base_tokens)} base, {len(candidate_tokens)} candidate, {n} rows")
        same = sum(list(a) == list(b) for a, b in zip(base_tokens, candidate_tokens))
        by = "tokens"
    else:
        same = sum(a == b for a, b in zip(base_texts, candidate_texts))
        by = "text"
    refs = [list(r) for r in references]
    base = generation_metrics(list(base_texts), refs)
    cand = generation_metrics(list(candidate_texts), refs)
    if base is None:
        raise ConversionError("the gate's rows have no references: ROUGE-L and BLEU need them (a `reference` "
                              "column)")
    rates = {m: loss_rate(base[m], cand[m]) for m in GATE_METRICS}
    keep = ("rouge_l", "bleu", "chrf")
    return GenerationGateResult(
        rows=n, rows_with_reference=int(base["rows_with_reference"]),
        base={m: float(base[m]) for m in keep}, candidate={m: float(cand[m]) for m in keep},
        loss_rate=rates, identical_rows=int(same), identical_share=same / n if n else 1.0, identical_by=by,
        max_loss_rate=float(max_loss_rate), passed=all(r <= max_loss_rate for r in rates.values()))


def format_generation_gate(gate: GenerationGateResult, candidate: str = "candidate") -> str:
    lines = [f"generation gate on {gate.rows} rows ({gate.rows_with_reference} with references):"]
    for m in GATE_METRICS:
        r = gate.loss_rate[m]
        lines.append(f"  {m:<8} base {gate.base[m]:.4f}  {candidate} {gate.candidate[m]:.4f}  loss rate "
                     f"{100 * r:.2f}% (limit {100 * gate.max_loss_rate:.2f}%)")
    lines.append(f"  identical to the base ({gate.identical_by}): {gate.identical_rows}/{gate.rows} "
                 f"({100 * gate.identical_share:.1f}%)")
    lines.append(f"  {'PASSED' if gate.passed else 'FAILED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generating


@dataclass(frozen=True)
class GateDecoding:
    """How the gate's outputs are generated: greedy, as `generate` with these flags would."""

    max_new_tokens: int = 64  # `generate`'s default
    chat: bool = False  # wrap plain prompts as one user turn (`messages` rows are always rendered)
    max_prompt_tokens: Optional[int] = None  # None: generate's default
    prompt_overflow: str = "truncate"
    columns: ColumnMap = field(default_factory=ColumnMap)

    def to_dict(self) -> dict:
        return {"strategy": "greedy", "max_new_tokens": self.max_new_tokens, "chat": self.chat,
                "max_prompt_tokens": self.max_prompt_tokens, "prompt_overflow": self.prompt_overflow,
                "columns": asdict(self.columns)}


@dataclass(frozen=True)
class GeneratedOutputs:
    """The best (greedy: only) candidate of each generated row, in input order."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]  # full-vocabulary ids (a pruned model's are mapped back)
    references: tuple[tuple[str, ...], ...]
    report: dict = field(default_factory=dict, compare=False)  # the run's report.json (tokens/s, unknown tokens)

    def to_json(self) -> dict:
        return {"ids": list(self.ids), "texts": list(self.texts), "token_ids": [list(t) for t in self.token_ids],
                "references": [list(r) for r in self.references]}

    @classmethod
    def from_json(cls, d: dict) -> "GeneratedOutputs":
        return cls(tuple(d["ids"]), tuple(d["texts"]), tuple(tuple(int(i) for i in t) for t in d["token_ids"]),
                   tuple(tuple(r) for r in d["references"]))


@dataclass(frozen=True)
class GateCandidate:
    """A model directory to gate, run at `precision` (what `generate --precision` takes)."""

    model_dir: Path
    precision: str = "fp32"


CandidateFn = Callable[[Sequence[Path], GateDecoding], GeneratedOutputs]


def read_generations(path: Path) -> GeneratedOutputs:
    """generations.jsonl (the `generate` output) -> the best candidate of each row."""
    ids, texts, tokens, refs = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            rec = json.loads(line)
            cands = rec["candidates"]
            assert cands, f"{path}: line {line_no}: row {rec['id']!r} has no candidate"
            ids.append(str(rec["id"]))
            texts.append(cands[0]["text"])
            tokens.append(tuple(int(i) for i in cands[0]["token_ids"]))
            refs.append(tuple(rec.get("references", ())))
    return GeneratedOutputs(tuple(ids), tuple(texts), tuple(tokens), tuple(refs))


def generate_outputs(model_dir: Path, files: Sequence[Path], decoding: GateDecoding, precision: str = "fp32",
                     threads: Optional[int] = None, workers: Optional[int] = 0) -> GeneratedOutputs:
    """Greedy outputs of the model in `model_dir` on `files`, through the `generate` job itself
    (written to a temporary folder and read back)."""
    from pipeline.config import GenerationOptions, RunConfig
    from pipeline.engine.modeldir import load_model_info
    from pipeline.job.run import run

    info = load_model_info(model_dir)
    opts = GenerationOptions(max_new_tokens=decoding.max_new_tokens, chat=decoding.chat,
                             max_prompt_tokens=decoding.max_prompt_tokens, prompt_overflow=decoding.prompt_overflow)
    with tempfile.TemporaryDirectory(prefix="generation-gate-") as tmp:
        cfg = RunConfig(inputs=tuple(Path(f) for f in files), model=Path(model_dir), out_dir=Path(tmp) / "out",
                        mode="generate", columns=decoding.columns, precision=precision, threads=threads,
                        workers=workers, progress=False, chunk_rows=64, window_rows=256, generation=opts)
        report = run(cfg, info)
        out = read_generations(Path(tmp) / "out" / "generations.jsonl")
    return GeneratedOutputs(out.ids, out.texts, out.token_ids, out.references, report)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def baseline_key(model_checksum: str, data_sha256: Sequence[str], decoding: GateDecoding) -> str:
    """The cache key of a base model's outputs: what they depend on, hashed."""
    what = {"format": BASELINE_FORMAT, "model": model_checksum, "data": list(data_sha256),
            "decoding": decoding.to_dict()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def baseline_outputs(base_dir: Path, files: Sequence[Path], decoding: GateDecoding,
                     cache_root: Optional[Path] = None, threads: Optional[int] = None,
                     generate: Optional[CandidateFn] = None) -> tuple[GeneratedOutputs, bool]:
    """The base model's outputs on `files`, from the cache when they are there; (outputs, cached).
    `generate` replaces the job (tests)."""
    from pipeline.engine.modeldir import load_model_info
    from pipeline.paths import cache_dir

    info = load_model_info(base_dir)
    key = baseline_key(info.checksum, [sha256_file(Path(f)) for f in files], decoding)
    path = Path(cache_root if cache_root is not None else cache_dir()) / BASELINE_CACHE / f"{key}.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("format") == BASELINE_FORMAT and rec.get("key") == key:
            return GeneratedOutputs.from_json(rec["outputs"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: rebuilt below
    out = (generate(files, decoding) if generate is not None
           else generate_outputs(Path(base_dir), files, decoding, "fp32", threads))
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"format": BASELINE_FORMAT, "key": key, "model": str(Path(base_dir).resolve()), "model_sha256": info.checksum,
           "data": [str(Path(f).resolve()) for f in files], "decoding": decoding.to_dict(),
           "pipeline_version": __version__, "outputs": out.to_json()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return out, False


@dataclass(frozen=True)
class GateRun:
    result: GenerationGateResult
    base: GeneratedOutputs
    candidate: GeneratedOutputs
    baseline_cached: bool


def run_generation_gate(base_dir: Path, candidate: Union[GateCandidate, CandidateFn], files: Sequence[Path],
                        decoding: GateDecoding = GateDecoding(), max_loss_rate: float = DEFAULT_MAX_LOSS_RATE,
                        cache_root: Optional[Path] = None, threads: Optional[int] = None) -> GateRun:
    """Generate with the base model (cached) and the candidate on `files` and compare them."""
    files = [Path(f) for f in files]
    base, cached = baseline_outputs(Path(base_dir), files, decoding, cache_root, threads)
    if isinstance(candidate, GateCandidate):
        cand = generate_outputs(candidate.model_dir, files, decoding, candidate.precision, threads)
    else:
        cand = candidate(files, decoding)
    if cand.ids != base.ids:
        missing = sorted(set(base.ids) - set(cand.ids))[:5]
        extra = sorted(set(cand.ids) - set(base.ids))[:5]
        raise ConversionError(f"the candidate generated other rows than the base model (missing {missing}, extra "
                              f"{extra}): a row rejected by one model only cannot be compared")
    result = compare_generations(base.texts, cand.texts, base.references, base_tokens=base.token_ids,
                                 candidate_tokens=cand.token_ids, max_loss_rate=max_loss_rate)
    return GateRun(result, base, cand, cached)


def gate_record(result: GenerationGateResult, *, base_dir: Path, data: Sequence[Path], decoding: GateDecoding,
                forced: bool, extra: Optional[dict] = None) -> dict:
    """What model.json "gates"[name] holds for a generation gate."""
    return {**result.to_json(), "forced": bool(forced and not result.passed), "kind": "generation",
            "base_model": str(Path(base_dir).resolve()), "data": [str(Path(f)) for f in data],
            "decoding": decoding.to_dict(), "pipeline_version": __version__, **(extra or {})}


def record_gate(model_dir: Path, name: str, record: dict) -> None:
    """Put `record` into model_dir/model.json "gates"[name] (replaced atomically)."""
    path = Path(model_dir) / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.setdefault("gates", {})[name] = record
    tmp = path.with_name(f".model.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
