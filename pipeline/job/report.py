"""Counts, stage times and the report of a run (no paddle): `Tally` is saved with every
committed window so a resumed run reports the whole job; `build_report` is report.json;
`format_summary` is what the CLI prints."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__
from pipeline.engine.engine import BatchStats
from pipeline.engine.text import TokenizeResult


MAX_WINDOWS = 200


@dataclass
class Tally:
    rows_scored: int = 0
    rows_rejected: int = 0
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated_pretokenized: int = 0
    unknown_tokens: int = 0  # pruned models: tokens of the tokenized sequences outside the kept vocab
    read_seconds: float = 0.0
    tokenize_seconds: float = 0.0
    tokenize_wait_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # task-specific totals (generation: tokens, steps)
    # throughput over the run: [elapsed s at the window's end, rows, tokens, session] per committed
    # window, elapsed summed over the sessions of a resumed run; at most MAX_WINDOWS entries
    # (neighbours merged pairwise when it would grow past that)
    windows: list[list[float]] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    def add_window(self, seconds: float, rows: int, tokens: int, session: int) -> None:
        self.elapsed_seconds += seconds
        self.windows.append([self.elapsed_seconds, rows, tokens, session])
        if len(self.windows) > MAX_WINDOWS:
            w = self.windows
            merged = [[b[0], a[1] + b[1], a[2] + b[2], b[3]] for a, b in zip(w[0::2], w[1::2])]
            self.windows = merged + ([w[-1]] if len(w) % 2 else [])

    def file(self, name: str) -> dict[str, int]:
        return self.per_file.setdefault(name, {"scored": 0, "rejected": 0})

    def add_tokenized(self, results: list[TokenizeResult]) -> None:
        for r in results:
            self.tokenize_seconds += r.seconds
            self.truncated_pretokenized += r.truncated
            self.unknown_tokens += r.unknown_tokens

    def add_batches(self, stats: BatchStats) -> None:
        self.sequences += stats.sequences
        self.tokens += stats.tokens
        self.padded_tokens += stats.padded_tokens
        self.batches += stats.batches
        self.infer_seconds += stats.seconds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    startup: float = 0.0
    rank: float = 0.0


def _head(timing: Timing, sessions: int, files: list[Path], task: str | None = None) -> dict:
    """The fields every report.json starts with (`task` only for tasks other than scoring)."""
    return {"pipeline_version": __version__, **({"task": task} if task else {}), "started_at": timing.started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sessions": sessions,
            "inputs": [str(f) for f in files]}


def _per_file(files: list[Path], rows_read: dict[str, int], tally: Tally, done_key: str) -> list[dict]:
    out = []
    for f in files:
        t = tally.per_file.get(str(f), {"scored": 0, "rejected": 0})
        out.append({"file": str(f), "rows_read": rows_read[str(f)], done_key: t["scored"], "rows_rejected": t["rejected"]})
    return out


def build_report(task: str, model, settings_dict: dict, files: list[Path], rows_read: dict[str, int],
                 tally: Tally, sections: dict, timing: Timing, sessions: int, reading: dict | None = None) -> dict:
    """report.json. `sections`: what the task's finish returned (`metrics`, and e.g. `outputs`);
    `reading`: how the inputs were read (TSV quoting rules, the reranking layout, judgements)."""
    reading = reading or {}
    if task == "generate":
        report = _generation_report(model, settings_dict, files, rows_read, tally, sections.get("metrics"), timing,
                                    sessions)
    else:
        report = _scoring_report(model, settings_dict, files, rows_read, tally, sections.get("metrics"), timing,
                                 sessions)
    quoting = reading.get("tsv_quoting", {})
    for entry in report["files"]:
        if entry["file"] in quoting:
            entry["tsv_quoting"] = quoting[entry["file"]]
    report.update({k: v for k, v in reading.items() if k != "tsv_quoting"})
    report["throughput"] = {"columns": ["elapsed_seconds", "rows", "tokens", "session"], "windows": tally.windows,
                            "tokens_are": "generated" if task == "generate" else "model input (real)"}
    report.update({k: v for k, v in sections.items() if k != "metrics"})
    return report


def _scoring_report(model, settings_dict: dict, files: list[Path], rows_read: dict[str, int], tally: Tally,
                    metrics: dict | None, timing: Timing, sessions: int) -> dict:
    per_file = _per_file(files, rows_read, tally, "rows_scored")
    total_s = time.perf_counter() - timing.started
    processing_s = total_s - timing.startup
    return {
        **_head(timing, sessions, files),
        "rows": {"read": sum(p["rows_read"] for p in per_file), "scored": tally.rows_scored,
                 "rejected": tally.rows_rejected},
        "files": per_file,
        "tokens": {
            "sequences": tally.sequences,
            "real": tally.tokens,
            "padded": tally.padded_tokens,
            "padding_overhead": (tally.padded_tokens / tally.tokens - 1.0) if tally.tokens else 0.0,
            "batches": tally.batches,
            "truncated_pretokenized": tally.truncated_pretokenized,
            "unknown_tokens": tally.unknown_tokens,
        },
        "seconds": {
            "startup": timing.startup,
            "read": tally.read_seconds,
            "tokenize": tally.tokenize_seconds,
            "tokenize_wait": tally.tokenize_wait_seconds,
            "infer": tally.infer_seconds,
            "rank": timing.rank,
            "write": tally.write_seconds,
            "total": total_s,
        },
        "rows_per_second": tally.rows_scored / processing_s if processing_s > 0 else 0.0,
        "tokens_per_second": tally.tokens / processing_s if processing_s > 0 else 0.0,
        "settings": settings_dict,
        "model": {
            "name": model.name, "path": str(model.path), "mode": model.task, "pooling": model.pooling,
            "precision": model.precision, "checksum": model.checksum, "source_sha256": model.source_sha256,
            "pruned_ids_kept": model.pruning.ids_kept if model.pruning else None,
        },
        "metrics": metrics,
    }


def _generation_report(model, settings_dict: dict, files: list[Path], rows_read: dict[str, int], tally: Tally,
                       metrics: dict | None, timing: Timing, sessions: int) -> dict:
    """report.json of a generation run: rows, prompt and generated tokens, padding, stage
    seconds, speed, settings, model, metrics."""
    c = lambda k: tally.counters.get(k, 0)  # noqa: E731
    per_file = _per_file(files, rows_read, tally, "rows_generated")
    total_s = time.perf_counter() - timing.started
    processing_s = total_s - timing.startup
    generated = int(c("generated_tokens"))
    return {
        **_head(timing, sessions, files, task="generate"),
        "rows": {"read": sum(p["rows_read"] for p in per_file), "generated": tally.rows_scored,
                 "rejected": tally.rows_rejected},
        "files": per_file,
        "tokens": {
            "prompts": tally.sequences,
            "prompt": tally.tokens,
            "prompt_padded": tally.padded_tokens,  # the batches' left-padded layout (what the cache holds)
            "padding_overhead": (tally.padded_tokens / tally.tokens - 1.0) if tally.tokens else 0.0,
            "prefill_computed": int(c("prefill_tokens")),  # what the grouped prefill calls computed
            "prefill_overhead": (c("prefill_tokens") / tally.tokens - 1.0) if tally.tokens else 0.0,
            "prompts_truncated": tally.truncated_pretokenized,
            # pruned models: prompt tokens outside the kept vocabulary, spelled out (engine/prompt_text.py)
            "unknown_tokens": tally.unknown_tokens,
            "generated": generated,
            "generated_best": int(c("generated_tokens_best")),
            "candidates": int(c("candidates")),
            "batches": tally.batches,
            "decode_steps": int(c("step_calls")),
            "row_steps": int(c("row_steps")),
            "idle_row_steps": int(c("idle_row_steps")),  # of row_steps: rows fed padding (finished or empty)
            "idle_row_steps_waiting": int(c("idle_row_steps_waiting")),  # continuous: of those, while prompts waited
            "cache_selects": int(c("selects")),
            "inserts": int(c("inserts")),  # continuous: prefill calls that refilled freed rows
            "inserted_prompts": int(c("inserted_prompts")),
            "compactions": int(c("compactions")),  # continuous: unused leading cache columns dropped
        },
        "seconds": {
            "startup": timing.startup,
            "read": tally.read_seconds,
            "tokenize": tally.tokenize_seconds,
            "tokenize_wait": tally.tokenize_wait_seconds,
            "generate": tally.infer_seconds,
            "prefill": c("prefill_seconds"),
            "decode_steps": c("step_seconds"),
            "compact": c("compact_seconds"),
            "detokenize": c("detokenize_seconds"),
            "rerank": c("rerank_seconds"),
            "write": tally.write_seconds,
            "total": total_s,
        },
        "rows_per_second": tally.rows_scored / processing_s if processing_s > 0 else 0.0,
        "generated_tokens_per_second": generated / processing_s if processing_s > 0 else 0.0,
        "settings": settings_dict,
        "model": {"name": model.name, "path": str(model.path), "mode": model.task, "precision": model.precision,
                  "checksum": model.checksum, "source_sha256": model.source_sha256},
        "metrics": metrics,
    }


def _format_generation_summary(report: dict, out_dir: Path) -> str:
    r, t, s = report["rows"], report["tokens"], report["seconds"]
    lines = [
        f"model      {report['model']['name']} (generate, "
        f"{report.get('precision', {}).get('used', report['model']['precision'])}: "
        f"{report.get('precision', {}).get('reason', 'as converted')})",
        f"rows       read {r['read']}  generated {r['generated']}  rejected {r['rejected']}",
        f"prompts    {t['prompt']} tokens in {t['batches']} batches, {t['prompt_padded']} with left padding "
        f"(+{100 * t['padding_overhead']:.1f}%), prefill computed {t['prefill_computed']} "
        f"(+{100 * t['prefill_overhead']:.1f}%), {t['prompts_truncated']} truncated"
        + (f", {t['unknown_tokens']} outside the pruned vocabulary (spelled out)" if t.get("unknown_tokens") else ""),
        f"generated  {t['generated']} tokens in {t['candidates']} candidates, {t['decode_steps']} decode steps",
        "seconds    " + "  ".join(f"{k} {v:.2f}" for k, v in s.items()),
        f"speed      {report['generated_tokens_per_second']:.1f} generated tokens/s, "
        f"{report['rows_per_second']:.2f} rows/s",
    ]
    m = report.get("metrics")
    if m:
        lines.append(f"metrics    BLEU {m['bleu']:.2f}  chrF {m['chrf']:.2f}  ROUGE-L {m['rouge_l']:.4f} "
                     f"({m['rows_with_reference']} rows with references)")
    if r["rejected"]:
        lines.append(f"rejects    {r['rejected']} rows, reasons in {out_dir / 'rejects.tsv'}")
    lines.append(f"outputs    {out_dir}/ (generations.jsonl, predictions.tsv, rejects.tsv, report.json, report.html, submission.zip)")
    return "\n".join(lines)


def format_summary(report: dict, out_dir: Path) -> str:
    if report.get("task") == "generate":
        return _format_generation_summary(report, out_dir)
    r, t, s = report["rows"], report["tokens"], report["seconds"]
    used = report.get("precision", {}).get("used", report["model"]["precision"])
    lines = [
        f"model      {report['model']['name']} ({report['model']['mode']}, {used}: "
        f"{report.get('precision', {}).get('reason', 'as converted')})",
        f"rows       read {r['read']}  scored {r['scored']}  rejected {r['rejected']}",
        f"tokens     {t['real']} real, {t['padded']} padded (+{100 * t['padding_overhead']:.1f}%), "
        f"{t['batches']} batches"
        + (f", {t.get('unknown_tokens', 0)} outside the pruned vocab ([UNK])"
           if report["model"].get("pruned_ids_kept") else ""),
        "seconds    " + "  ".join(f"{k} {v:.2f}" for k, v in s.items()),
        f"speed      {report['rows_per_second']:.1f} rows/s, {report['tokens_per_second']:.0f} tokens/s",
    ]
    m = report.get("metrics")
    if m:
        f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731 - undefined metrics are None
        recall = f"  R@{m['recall_k']} {f(m['recall'])}" if m.get("recall_k") else ""
        lines.append(f"metrics    MRR@10 {f(m['mrr_at_10'])}  NDCG@10 {f(m['ndcg_at_10'])} (gain 2^rel-1), "
                     f"{f(m.get('ndcg_at_10_linear'))} (gain rel, trec_eval){recall}  PNR {f(m['pnr'])} "
                     f"({m['pairs_correct']} pairs right, {m['pairs_wrong']} wrong, {m['pairs_tied']} tied)")
        j = report.get("judgements", {})
        where = f"qrels {j['file']}" if j.get("source") == "qrels" else "the rows' labels"
        missing = (f", {m['relevant_missing']} relevant judgements not among the candidates"
                   if m.get("relevant_missing") is not None else "")
        lines.append(f"judged by  {where}: {m['queries']} queries, {m.get('unjudged_rows', 0)} unjudged rows "
                     f"(ranked, not relevant){missing}")
    if r["rejected"]:
        lines.append(f"rejects    {r['rejected']} rows, reasons in {out_dir / 'rejects.tsv'}")
    lines.append(f"outputs    {out_dir}/ (ranked.tsv, run.trec, predictions.tsv, rejects.tsv, report.json, report.html, submission.zip)")
    return "\n".join(lines)


class _NoProgress:
    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, initial: int = 0, unit: str = "rows"):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    what = "generated tokens" if unit == "tokens" else unit
    return tqdm(unit=unit, initial=initial, smoothing=0.1, dynamic_ncols=True,
                bar_format="{desc}{n:.0f} " + what + " [{elapsed}, {rate_fmt}]")
