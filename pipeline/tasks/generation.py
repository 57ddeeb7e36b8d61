"""The generation task: ranked candidate texts for every prompt of the input.

Per window (as for scoring: `pipeline.job` drives it):
  reader thread:  `prepare(chunk)` -> a prompts / messages `TokenizeRequest` (the workers render
                  the chat template, tokenize, apply the prompt limit);
  main thread:    `process` -> the generator (`engine.generator`) decodes the window's prompts
                  in pre-padded batches; each batch's candidates are detokenized in the tokenizer
                  pool while the next batch decodes and, with `--rerank-model`,
                  re-scored by a scoring model; one committed row per prompt;
  at the end:     `finish` -> generations.jsonl, predictions.tsv, rejects.tsv and the metrics
                  (sacrebleu BLEU and chrF, rouge-score ROUGE-L) when references exist.

Committed rows hold their candidates as one JSON string (`json.dumps` escapes tabs and newlines,
so the store's cleaning of string columns leaves it intact and the generated text keeps its
newlines in generations.jsonl; predictions.tsv, being TSV, gets them as spaces). The sampling
key of a row is its id: a sample depends on the seed and the row, not on the batch or window it
lands in.

Candidates are ranked by the decoder's `score` (the beam score for beam search, the mean
log-probability otherwise: both length-normalised). With a re-ranker every candidate also gets
`rerank_score` (the scoring model's score of (prompt text, candidate text): a cross-encoder's
relevance, or a bi-encoder's cosine), and the candidates are ordered by it, ties kept in
decoder order; both scores are written.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Callable
from dataclasses import replace
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cancel import CancelToken
from pipeline.engine.decoding_settings import STOP, Candidate
from pipeline.engine.engine import BatchStats
from pipeline.engine.prompt_text import DETOKENIZE, PromptEncoderSpec
from pipeline.engine.text import TokenizeRequest
from pipeline.errors import ConfigError
from pipeline.io.prompts import PromptReader
from pipeline.io.row_texts import cut_text
from pipeline.io.rows import PromptChunk, Reject
from pipeline.io.store import RunStore, clean
from pipeline.tasks.base import FinishSpec, InputSpec, Item, WindowOutput

GENERATION_FILES = ("generations.jsonl", "predictions.tsv", "rejects.tsv", "report.json", "submission.zip")
GENERATED_SCHEMA = pa.schema([
    ("row", pa.int64()), ("file", pa.int32()), ("line", pa.int64()), ("id", pa.string()),
    ("prompt_tokens", pa.int32()), ("prompt_truncated", pa.bool_()),
    ("references", pa.string()),  # JSON list
    ("candidates", pa.string()),  # JSON list, ranked
])


def one_line(s: str) -> str:
    """A TSV field on one line: tabs and every character Python's splitlines breaks at (generated
    text may hold \v, \x85, \u2028 ...) become spaces."""
    return " ".join(clean(s).splitlines()) if s else s


def prompt_text(chunk: PromptChunk, i: int) -> str:
    """The text a re-ranker compares candidates with: the prompt, or the last user turn."""
    if chunk.prompt is not None:
        return chunk.prompt[i]
    turns = chunk.messages[i]
    users = [t["content"] for t in turns if t["role"] == "user"]
    return users[-1] if users else turns[-1]["content"]


def candidate_record(c: Candidate, text: str) -> dict:
    rec = {"text": text, "num_tokens": c.num_tokens, "sum_logprob": c.sum_logprob, "mean_logprob": c.mean_logprob,
           "score": c.score, "finish_reason": c.finish_reason, "token_ids": list(c.token_ids)}
    if c.finish_reason == STOP:
        rec["stop_string"] = c.stop_string
    return rec


def candidate_text(text: str, c: Candidate) -> str:
    """The candidate's text (its tokens detokenized); a stop string and what follows it are cut
    (the record keeps which string it was)."""
    if c.finish_reason == STOP and c.stop_string:
        cut = text.find(c.stop_string)
        if cut >= 0:
            text = text[:cut]
    return text


class GenerationRuntime:
    """What `process` calls: the generator, a detokenizer (the job's tokenizer pool when there is
    one, else in-process), and the optional re-ranker."""

    def __init__(self, model, settings, backend=None, pool=None):
        from pipeline.engine.generator import Generator

        g = settings.generation
        self.pool = pool
        self.prompts = PromptEncoderSpec.of(model, g.max_prompt_tokens, g.prompt_overflow, g.chat).build()
        if backend is None and settings.device == "gpu":  # validated at start-up: a CUDA build, the fused export
            from pipeline.engine.decoder_gpu import fused_backend

            backend = fused_backend(model.path)
        self.generator = Generator(model, settings.generator, backend)
        self.vocab_map = getattr(model, "vocab_map", None)  # a pruned model's rows -> full ids
        self.reranker = None
        try:
            if g.rerank_model is not None:
                self.reranker = _open_reranker(Path(g.rerank_model), settings)
        except BaseException:
            self.generator.close()
            raise

    def full_ids(self, rows) -> tuple[int, ...]:
        """Generated model rows -> full-vocabulary ids (the same for an unpruned model)."""
        if self.vocab_map is None:
            return tuple(rows)
        return tuple(self.vocab_map.full(list(rows)).tolist())

    def full_candidates(self, cands: list[list[Candidate]]) -> list[list[Candidate]]:
        if self.vocab_map is None:
            return cands
        return [[replace(c, token_ids=self.full_ids(c.token_ids)) for c in cs] for cs in cands]

    def decode(self, ids) -> str:
        """Generated model rows -> text (what stop strings are looked for in)."""
        return self.prompts.decode(self.full_ids(ids))

    def detokenize(self, id_lists: list) -> Future:
        """A Future of the texts (`Detokenized`) of `id_lists`, from the pool's worker processes
        (so the main thread goes on decoding the next batch meanwhile)."""
        req = TokenizeRequest(DETOKENIZE, 0, [list(i) for i in id_lists])
        if self.pool is not None and self.pool.workers > 0:
            return self.pool.submit(req)
        f: Future = Future()
        f.set_result(self.prompts.run(req))
        return f

    def close(self) -> None:
        self.generator.close()
        if self.reranker is not None:
            self.reranker.close()

    def __enter__(self) -> "GenerationRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_reranker(path: Path, settings):
    """A scoring model's engine, for re-ranking candidates (one stream, the run's threads)."""
    from pipeline.engine.engine import Engine, EngineSettings
    from pipeline.engine.modeldir import ModelInfo, load_model_info

    info = load_model_info(path)
    if not isinstance(info, ModelInfo):
        raise ConfigError(f"--rerank-model {path} is a generation model; give a scoring model (cross or bi)")
    return Engine(info, EngineSettings(max_seq_len=info.max_seq_len, max_batch_tokens=8192, max_batch_size=64,
                                       pad_multiple=1, threads=settings.threads, streams=1))


class Generation:
    name, model_output, input_kinds = "generate", "tokens", ("text",)
    output_files = GENERATION_FILES
    progress_unit = "tokens"

    def open_reader(self, spec: InputSpec) -> PromptReader:
        if spec.rerank is not None:
            raise ConfigError("the reranking layout (--queries/--corpus/--candidates) is for scoring models")
        return PromptReader(spec.files, spec.columns, chunk_rows=spec.chunk_rows, tsv_quoting=spec.tsv_quoting)

    def encoder_spec(self, model, settings) -> PromptEncoderSpec:
        g = settings.generation
        return PromptEncoderSpec.of(model, g.max_prompt_tokens, g.prompt_overflow, g.chat)

    def open_engine(self, model, settings, backend, pool=None) -> GenerationRuntime:
        return GenerationRuntime(model, settings, backend, pool)

    def prepare(self, chunk: PromptChunk, rejects: list[Reject], max_seq_len: int) -> Item:
        if chunk.messages is not None:
            return Item(chunk, rejects, TokenizeRequest("messages", max_seq_len, chunk.messages))
        return Item(chunk, rejects, TokenizeRequest("prompts", max_seq_len, chunk.prompt))

    def process(self, engine: GenerationRuntime, items: list[Item], results, file_index: dict[str, int],
                cancel: CancelToken | None, on_batch: Callable[[int], None]) -> WindowOutput:
        rejects = [r for it in items for r in it.rejects]
        pending = [(it, res) for it, res in zip((it for it in items if it.chunk is not None), results)]
        prompts, keys, where = [], [], []  # where: (item index, row in chunk) per prompt
        for k, (it, res) in enumerate(pending):
            c = it.chunk
            ok = [i for i in range(len(c)) if i not in res.failed]
            rejects += [Reject(c.file, int(c.line[i]), int(c.row[i]), why, c.id[i]) for i, why in res.failed.items()]
            prompts += res.ids
            keys += [c.id[i] for i in ok]
            where += [(k, i) for i in ok]
        decoding = engine.generator.settings.decoding
        decode = engine.decode if decoding.stop_strings else None
        pending_texts = []  # per batch: (prompt indices, candidates per prompt, Future of the texts)

        def detokenize(rows, out):
            pending_texts.append((rows, [len(cs) for cs in out],
                                  engine.detokenize([engine.full_ids(c.token_ids) for cs in out for c in cs])))

        cands, stats = engine.generator.generate(prompts, keys, decode, cancel,
                                                 on_batch=lambda rows, tokens: on_batch(tokens),
                                                 on_candidates=detokenize)
        cands = engine.full_candidates(cands)  # outputs hold full-vocabulary ids, pruned model or not
        texts: list = [None] * len(cands)
        detok_s = 0.0
        for rows, counts, future in pending_texts:
            done = future.result()
            detok_s += done.seconds
            flat = iter(done.texts)
            for r, n in zip(rows.tolist(), counts):
                texts[r] = [candidate_text(next(flat), c) for c in cands[r]] if n else []
        rerank = self._rerank(engine, pending, where, texts, cancel)
        table, per_file = self._table(pending, prompts, where, cands, texts, rerank, file_index)
        counters = {
            "generated_tokens": stats.generated_tokens,
            "generated_tokens_best": sum(cs[0].num_tokens for cs in cands if cs),
            "candidates": sum(len(cs) for cs in cands), "step_calls": stats.step_calls,
            "row_steps": stats.row_steps, "selects": stats.selects, "prefill_seconds": stats.prefill_seconds,
            "step_seconds": stats.step_seconds, "detokenize_seconds": detok_s,
            "prefill_tokens": stats.prefill_tokens,
            "idle_row_steps": stats.idle_row_steps, "idle_row_steps_waiting": stats.idle_row_steps_waiting,
            "inserts": stats.inserts, "inserted_prompts": stats.inserted_prompts,
            "compactions": stats.compactions, "compact_seconds": stats.compact_seconds,
            "rerank_seconds": rerank[1] if rerank else 0.0,
        }
        batch_stats = BatchStats(sequences=stats.prompts, tokens=stats.prompt_tokens,
                                 padded_tokens=stats.padded_prompt_tokens, batches=stats.batches, seconds=stats.seconds)
        return WindowOutput(table, sorted(rejects, key=lambda r: r.row), batch_stats, per_file, counters)

    @staticmethod
    def _rerank(engine: GenerationRuntime, pending, where, texts, cancel):
        """Re-ranker scores per candidate (None without a re-ranker) and the seconds it took."""
        if engine.reranker is None or not texts:
            return None
        t0 = time.perf_counter()
        queries, docs = [], []
        for (k, i), ts in zip(where, texts):
            q = prompt_text(pending[k][0].chunk, i)
            queries += [q] * len(ts)
            docs += [t if t.strip() else " " for t in ts]  # an empty candidate still gets a score
        scores = engine.reranker.score_pairs(queries, docs, cancel)
        out, start = [], 0
        for ts in texts:
            out.append(scores[start:start + len(ts)].tolist())
            start += len(ts)
        return out, time.perf_counter() - t0

    @staticmethod
    def _table(pending, prompts, where, cands, texts, rerank, file_index):
        cols = {n: [] for n in GENERATED_SCHEMA.names}
        per_file: dict[str, int] = {}
        for j, ((k, i), cs, ts) in enumerate(zip(where, cands, texts)):
            it, res = pending[k]
            c = it.chunk
            records = [candidate_record(cand, t) for cand, t in zip(cs, ts)]
            if rerank is not None:
                for rec, s in zip(records, rerank[0][j]):
                    rec["rerank_score"] = s
                order = sorted(range(len(records)), key=lambda m: -records[m]["rerank_score"])
                records = [records[m] for m in order]
            cols["row"].append(int(c.row[i]))
            cols["file"].append(file_index[c.file])
            cols["line"].append(int(c.line[i]))
            cols["id"].append(c.id[i])
            cols["prompt_tokens"].append(len(prompts[j]))
            cols["prompt_truncated"].append(i in res.truncated_items)
            cols["references"].append(json.dumps(list(c.reference[i]), ensure_ascii=False))
            cols["candidates"].append(json.dumps(records, ensure_ascii=False))
            per_file[c.file] = per_file.get(c.file, 0) + 1
        table = pa.table(cols, schema=GENERATED_SCHEMA)
        order = np.argsort(table.column("row").to_numpy(), kind="stable")
        return table.take(pa.array(order)), per_file

    def finish(self, store: RunStore, spec: FinishSpec, cancel: CancelToken | None) -> dict:
        from pipeline.tasks.text_metrics import generation_metrics, rouge_l_per_row

        cancel = cancel or CancelToken()
        hyps, refs, rouge = [], [], []
        sample, outputs = _Sample(), _OutputSummary()
        with open(store.partial / "generations.jsonl", "w", encoding="utf-8", newline="\n") as gen, \
                open(store.partial / "predictions.tsv", "w", encoding="utf-8", newline="\n") as pred:
            pred.write("id\tprediction\n")
            for w in range(store.windows):
                cancel.check()
                t = store.read_part(w, ["row", "id", "prompt_tokens", "prompt_truncated", "references",
                                        "candidates"]).to_pydict()
                rows = []
                for row, rid, n, cut, ref, cand in zip(t["row"], t["id"], t["prompt_tokens"], t["prompt_truncated"],
                                                       t["references"], t["candidates"]):
                    cands, ref = json.loads(cand), json.loads(ref)
                    rec = {"id": rid, "prompt_tokens": n, "prompt_truncated": cut, "candidates": cands}
                    if ref:
                        rec["references"] = ref
                    gen.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    best = cands[0]["text"] if cands else ""
                    pred.write(f"{one_line(rid)}\t{one_line(best)}\n")
                    outputs.add(cands)
                    rows.append((row, rid, best, ref, cands))
                window_rouge = rouge_l_per_row([r[2] for r in rows], [r[3] for r in rows])
                for (row, rid, best, ref, cands), score in zip(rows, window_rouge):
                    sample.add(row, rid, ref, cands, score)
                    if ref:
                        hyps.append(best)
                        refs.append(ref)
                        rouge.append(score)
        _write_rejects(store)
        return {"metrics": generation_metrics(hyps, refs, rouge_l=rouge) if spec.labelled else None,
                "outputs": outputs.section(), "sample": sample.section(spec.row_texts)}


SAMPLE_ROWS = 50  # rows report.json keeps for report.html's browsable sample (texts cut as the prompts)


class _OutputSummary:
    """Every row's best-candidate length and every candidate's finish reason, as counts."""

    def __init__(self) -> None:
        self.lengths: dict[int, int] = {}
        self.reasons: dict[str, int] = {}

    def add(self, cands: list[dict]) -> None:
        if cands:
            n = int(cands[0]["num_tokens"])
            self.lengths[n] = self.lengths.get(n, 0) + 1
        for c in cands:
            self.reasons[c["finish_reason"]] = self.reasons.get(c["finish_reason"], 0) + 1

    def section(self) -> dict:
        return {"best_candidate_tokens": [[n, self.lengths[n]] for n in sorted(self.lengths)],
                "finish_reasons": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


class _Sample:
    """report.json's `sample`: the SAMPLE_ROWS rows with references of lowest ROUGE-L of the best
    candidate (ties: input order), then, to fill up, the first rows without a reference."""

    def __init__(self) -> None:
        self.worst: list[tuple] = []  # (-rouge, -row, record): a max-heap of the lowest ROUGE-L kept
        self.unreferenced: list[dict] = []
        self.rows = 0

    def add(self, row: int, rid: str, refs: list, cands: list[dict], rouge: float | None) -> None:
        self.rows += 1
        rec = {"id": rid, "row": int(row), "rouge_l": rouge, "references": [cut_text(r) for r in refs if r is not None],
               "candidates": [{"text": cut_text(c["text"]), "score": c["score"], "num_tokens": c["num_tokens"],
                               "finish_reason": c["finish_reason"]} for c in cands]}
        if rouge is None:
            if len(self.unreferenced) < SAMPLE_ROWS:
                self.unreferenced.append(rec)
        elif len(self.worst) < SAMPLE_ROWS:
            heapq.heappush(self.worst, (-rouge, -row, rec))
        elif (-rouge, -row) > self.worst[0][:2]:
            heapq.heapreplace(self.worst, (-rouge, -row, rec))

    def section(self, row_texts) -> dict:
        rows = [rec for _, _, rec in sorted(self.worst, key=lambda x: (-x[0], -x[1]))]
        rows += self.unreferenced[:SAMPLE_ROWS - len(rows)]
        texts = row_texts([r["row"] for r in rows]) if row_texts is not None else {}
        for r in rows:
            t = texts.get(r["row"], {})
            r.update(file=t.get("file"), line=t.get("line"), prompt=t.get("prompt"))
        return {"rows": rows, "of": self.rows, "order": "lowest ROUGE-L of the best candidate first, then rows "
                "without a reference in input order"}


def _write_rejects(store: RunStore) -> None:
    with open(store.partial / "rejects.tsv", "w", encoding="utf-8", newline="\n") as out:
        out.write("file\tline\tid\treason\n")
        for w in range(store.windows):
            t = store.read_rejects(w).to_pydict()
            out.write("".join(f"{f}\t{line}\t{i}\t{r}\n" for f, line, i, r in
                              zip(t["file"], t["line"], t["qid"], t["reason"])))
