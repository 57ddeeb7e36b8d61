"""The two scoring tasks: one relevance score per (qid, doc_id) row, ranked per query.

- `cross`: `[CLS] query [SEP] doc [SEP]` (or pre-tokenized ids) through a model with a score
  head; the score is the model's output.
- `bi`: every distinct text of a window is encoded once by a model with an embedding head; the
  score is the cosine of the query's and the doc's unit embeddings. There is no cache across
  windows: a window's scores depend only on the window, which keeps resumed runs byte-identical
  to uninterrupted ones.

Both commit the same table (row, file, line, qid, doc_id, label, score) and write the same
final files (`pipeline.io.exports`: predictions, ranking, TREC run, rejects) and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.cancel import CancelToken
from pipeline.engine.engine import Engine, cosine, distinct
from pipeline.engine.text import TextEncoderSpec, TokenizeRequest, TokenizeResult
from pipeline.engine.tokenizer import Encoded
from pipeline.io.exports import write_ranking_outputs
from pipeline.io.reader import Chunk, DatasetReader, Reject
from pipeline.io.rerank import RerankReader
from pipeline.io.store import FILES, RunStore
from pipeline.tasks.base import FinishSpec, InputSpec, Item, WindowOutput, sequence_built

SCORED_SCHEMA = pa.schema([("row", pa.int64()), ("file", pa.int32()), ("line", pa.int64()), ("qid", pa.string()),
                           ("doc_id", pa.string()), ("label", pa.float64()), ("score", pa.float64())])


def scored_output(items: list[Item], scores: list[np.ndarray], reasons: list[dict[int, str]],
                  file_index: dict[str, int]) -> tuple[pa.Table, list[Reject], dict[str, int]]:
    """The window's scored rows as one table (input order) and its rejects (sorted by row):
    the readers' rejects plus every row without a score (NaN), with its reason."""
    rejects = [r for it in items for r in it.rejects]
    parts, per_file = [], {}
    for it, sc, why in zip((it for it in items if it.chunk is not None), scores, reasons):
        c = it.chunk
        bad = np.isnan(sc)
        rejects += [Reject(c.file, int(c.line[i]), int(c.row[i]), why.get(i, "tokenizer error"), c.qid[i], c.doc_id[i])
                    for i in np.flatnonzero(bad)]
        keep = np.flatnonzero(~bad)
        parts.append(pa.table({
            "row": c.row[keep], "file": np.full(len(keep), file_index[c.file], dtype=np.int32),
            "line": c.line[keep], "qid": [c.qid[i] for i in keep], "doc_id": [c.doc_id[i] for i in keep],
            "label": c.label[keep] if c.label is not None else np.full(len(keep), np.nan),
            "score": sc[keep]}, schema=SCORED_SCHEMA))
        per_file[c.file] = per_file.get(c.file, 0) + len(keep)
    table = pa.concat_tables(parts) if parts else SCORED_SCHEMA.empty_table()
    return table, sorted(rejects, key=lambda r: r.row), per_file


def _add_texts(worst: list[dict], row_texts) -> None:
    """The worst queries' query text and their top documents' texts, file and line (read again
    from the inputs); None where the input has no texts (pre-tokenized)."""
    texts = row_texts([d["row"] for w in worst for d in w["top"]])
    for w in worst:
        found = [texts[d["row"]] for d in w["top"] if d["row"] in texts]
        w["query"] = found[0]["query"] if found else None
        for d in w["top"]:
            t = texts.get(d["row"], {})
            d.update(file=t.get("file"), line=t.get("line"), text=t.get("doc"))


class _Scoring:
    """What both scoring tasks share: the committed table, the final files and the metrics."""

    name: str
    model_output: str
    input_kinds: tuple[str, ...]
    output_files = FILES + ("queries.tsv",)
    progress_unit = "rows"

    def open_reader(self, spec: InputSpec) -> DatasetReader | RerankReader:
        if spec.rerank is not None:
            return RerankReader(spec.rerank, spec.columns, spec.chunk_rows, spec.index_cache, spec.tsv_quoting)
        return DatasetReader(spec.files, spec.columns, chunk_rows=spec.chunk_rows, tsv_quoting=spec.tsv_quoting)

    def encoder_spec(self, model, settings) -> TextEncoderSpec:
        return TextEncoderSpec.of(model)

    def open_engine(self, model, settings, backend, pool=None) -> Engine:
        return Engine(model, settings.engine, backend)

    def finish(self, store: RunStore, spec: FinishSpec, cancel: CancelToken | None) -> dict:
        out = write_ranking_outputs(store, spec.run_tag, spec.labelled or spec.judgements is not None, cancel,
                                    judgements=spec.judgements, recall_k=spec.recall_k)
        sections = {"metrics": out.metrics.to_dict() if out.metrics else None,
                    "outputs": {"trec_escaped_rows": out.trec_escaped_rows}, "scores": out.scores_section()}
        if out.metrics is not None and out.ndcg_counts is not None:
            sections["queries"] = out.queries_section()
            if spec.row_texts is not None:
                _add_texts(sections["queries"]["worst"], spec.row_texts)
        return sections

    def process(self, engine: Engine, items: list[Item], results: list[TokenizeResult], file_index: dict[str, int],
                cancel: CancelToken | None, on_batch: Callable[[int], None]) -> WindowOutput:
        pending = [it for it in items if it.chunk is not None]
        scores, reasons, stats = self.score(engine, pending, results, cancel, on_batch)
        table, rejects, per_file = scored_output(items, scores, reasons, file_index)
        return WindowOutput(table, rejects, stats, per_file)


class CrossScoring(_Scoring):
    name, model_output, input_kinds = "cross", "score", ("text", "pretokenized")

    def prepare(self, chunk: Chunk, rejects: list[Reject], max_seq_len: int) -> Item:
        if chunk.input_ids is not None:
            return Item(chunk, rejects, TokenizeRequest("pretokenized", max_seq_len, chunk.input_ids, chunk.token_type_ids))
        return Item(chunk, rejects, TokenizeRequest("pairs", max_seq_len, chunk.query, chunk.doc))

    def score(self, engine, items, results, cancel, on_batch):
        out, stats = engine.run_encoded(Encoded.concat([r.enc for r in results]), cancel, on_batch)
        out, scores, start = out.astype(np.float64), [], 0
        for it, r in zip(items, results):
            s = np.full(len(it.chunk), np.nan)
            s[sequence_built(len(it.chunk), r.failed)] = out[start:start + len(r.enc)]
            start += len(r.enc)
            scores.append(s)
        return scores, [dict(r.failed) for r in results], stats


class BiScoring(_Scoring):
    name, model_output, input_kinds = "bi", "embedding", ("text",)

    def prepare(self, chunk: Chunk, rejects: list[Reject], max_seq_len: int) -> Item:
        """Every distinct text of the chunk is tokenized once, however many rows use it."""
        texts, idx = distinct(chunk.query + chunk.doc)
        return Item(chunk, rejects, TokenizeRequest("texts", max_seq_len, texts), (idx[:len(chunk)], idx[len(chunk):]))

    def score(self, engine, items, results, cancel, on_batch):
        slot_of: dict[str, int] = {}
        parts, chunk_slots = [], []
        for item, res in zip(items, results):
            texts = item.request.a
            ok = sequence_built(len(texts), res.failed)
            enc_pos = np.cumsum(ok) - 1  # text index in the chunk -> index in res.enc
            slots, new = np.full(len(texts), -1, dtype=np.int64), []
            for i in np.flatnonzero(ok).tolist():
                slot = slot_of.get(texts[i])
                if slot is None:
                    slot = slot_of[texts[i]] = len(slot_of)
                    new.append(int(enc_pos[i]))
                slots[i] = slot
            if new:
                idx = np.array(new)
                parts.append(Encoded(res.enc.ids.take(idx), res.enc.types.take(idx)))
            chunk_slots.append(slots)
        table, stats = engine.run_encoded(Encoded.concat(parts), cancel, on_batch)
        table = table.astype(np.float64)
        scores, reasons = [], []
        for item, res, slots in zip(items, results, chunk_slots):
            q_idx, d_idx = item.extra
            qs, ds = slots[q_idx], slots[d_idx]
            valid = (qs >= 0) & (ds >= 0)
            score = np.full(len(q_idx), np.nan)
            score[valid] = cosine(table, qs[valid], ds[valid])
            scores.append(score)
            reasons.append(_text_failures(q_idx, d_idx, res.failed))
        return scores, reasons, stats


def _text_failures(q_idx: np.ndarray, d_idx: np.ndarray, failed: dict[int, str]) -> dict[int, str]:
    """Reasons for rows whose query or doc text could not be tokenized (the doc's wins)."""
    out = {}
    if failed:
        for i in range(len(q_idx)):
            for slot, what in ((q_idx[i], "query"), (d_idx[i], "doc")):
                if slot in failed:
                    out[i] = f"{what}: {failed[slot]}"
    return out
