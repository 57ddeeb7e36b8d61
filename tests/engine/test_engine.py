"""The in-memory engine: order restore across concurrent streams, cancellation, encode and
score_pairs against what a run writes, two models in one process, and a Ray Data style
`map_batches` callable on top of the engine API."""

import threading
import time

import numpy as np
import pytest

from pipeline.cancel import Cancelled, CancelToken
from pipeline.engine.engine import Engine, EngineSettings
from pipeline.engine.modeldir import load_model_info
from pipeline.engine.text import TextEncoderSpec, TokenizeRequest
from pipeline.engine.tokenizer import Encoded, Ragged
from tests.sample_data import sample_rows


class SlowBackend:
    """Backend double: scores = first token id; later batches finish first, on several threads."""

    def __init__(self, concurrency):
        self.concurrency, self.threads, self.calls, self._lock = concurrency, set(), 0, threading.Lock()

    def run(self, ids, types, mask):
        with self._lock:
            self.calls += 1
            self.threads.add(threading.get_ident())
        time.sleep(0.02 / ids.shape[1])  # long batches are quick, so results arrive out of order
        return ids[:, 0].astype(np.float32)


def _engine(model_dir, backend):
    s = EngineSettings(max_seq_len=20, max_batch_size=3, max_batch_tokens=64, threads=2, streams=2)
    return Engine(load_model_info(model_dir), s, backend)


def _encoded(first_ids, lengths):
    ids = [np.concatenate([[f], np.full(n - 1, 5)]).astype(np.int64) for f, n in zip(first_ids, lengths)]
    return Encoded(Ragged.from_lists(ids), Ragged.from_lists([np.zeros(len(x), np.int64) for x in ids]))


def test_concurrent_streams_keep_every_output_in_its_row(tiny_cross_dir):
    lengths = np.random.default_rng(0).integers(2, 20, size=40)
    backend = SlowBackend(concurrency=2)
    with _engine(tiny_cross_dir, backend) as engine:
        out, stats = engine.run_encoded(_encoded(1000 + np.arange(40), lengths))
    assert np.array_equal(out, 1000 + np.arange(40)), "outputs must land in their sequences' rows"
    assert backend.calls > 2 and len(backend.threads) == 2, "batches must run on both streams"
    assert stats.sequences == 40 and stats.tokens == int(lengths.sum()) and stats.batches == backend.calls
    assert stats.padded_tokens >= stats.tokens


def test_cancel_stops_concurrent_streams(tiny_cross_dir):
    cancel, done = CancelToken(), []
    backend = SlowBackend(concurrency=2)

    def on_batch(n):
        done.append(n)
        if len(done) == 2:
            cancel.cancel()

    with _engine(tiny_cross_dir, backend) as engine, pytest.raises(Cancelled):
        engine.run_encoded(_encoded(np.full(60, 7), np.full(60, 5)), cancel, on_batch)
    assert len(done) == 2
    assert backend.calls <= 2 + 2 * 2, "no batch may start once the cancel is seen beyond those in flight"


def test_score_pairs_equals_the_scores_a_run_writes(tiny_cross_dir, tiny_bi_dir, tmp_path):
    """The engine API and `run` are one code path: same scores, bit for bit."""
    from pipeline.cli import main
    from tests.sample_data import write_tsv

    rows = sample_rows(3)
    data = write_tsv(tmp_path / "in.tsv", rows)
    for model in (tiny_cross_dir, tiny_bi_dir):
        out = tmp_path / model.name
        assert main(["run", str(data), "--model", str(model), "--out", str(out), "--no-progress",
                     "--workers", "0", "--threads", "1"]) == 0
        written = [float(line.split("\t")[2]) for line in (out / "predictions.tsv").read_text().splitlines()]
        info = load_model_info(model)
        with Engine(info, EngineSettings(max_seq_len=info.max_seq_len)) as engine:
            got = engine.score_pairs([r["query"] for r in rows], [r["doc"] for r in rows])
        assert got.dtype == np.float64 and got.tolist() == written, model.name


def test_encode_gives_unit_embeddings_in_input_order(tiny_bi_dir):
    info = load_model_info(tiny_bi_dir)
    texts = ["alpha beta", "gamma", "alpha beta", "delta epsilon zeta"]
    with Engine(info, EngineSettings(max_seq_len=info.max_seq_len)) as engine:
        emb = engine.encode(texts)
        alone = engine.encode([texts[3]])
    assert emb.shape == (4, info.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb[0], emb[2])
    np.testing.assert_allclose(emb[3], alone[0], atol=1e-6)  # another batch shape, same embedding


def test_two_text_encoders_in_one_process_keep_their_own_id_maps(tiny_cross_dir, tmp_path):
    """No tokenizer or id map lives in module globals: a pruned model's map applies to its own
    encoder only, whatever order the two are built and used in."""
    info = load_model_info(tiny_cross_dir)
    full = TextEncoderSpec.of(info)
    id_map = np.arange(info.vocab_size, dtype=np.int32)[::-1].copy()  # any map unlike the identity
    np.save(tmp_path / "map.npy", id_map)
    mapped = TextEncoderSpec(full.vocab_file, full.tokenizer, str(tmp_path / "map.npy"))
    a, b = mapped.build(), full.build()
    req = TokenizeRequest("texts", 16, ["a small test", "of two encoders"])
    ids_b, ids_a = b.run(req).enc.ids.flat.copy(), a.run(req).enc.ids.flat.copy()
    assert np.array_equal(ids_a, id_map[ids_b])
    assert np.array_equal(b.run(req).enc.ids.flat, ids_b), "the mapped encoder must not change the other"
    assert a.pad_id == id_map[b.pad_id]


class ScoreRows:
    """A Ray Data `map_batches` callable class (`ds.map_batches(ScoreRows, fn_constructor_args=(dir,),
    batch_format="numpy", concurrency=n)`): one engine per actor, a column batch in, scores added."""

    def __init__(self, model_dir, threads: int = 1):
        info = load_model_info(model_dir)
        self.engine = Engine(info, EngineSettings(max_seq_len=info.max_seq_len, threads=threads))

    def __call__(self, batch: dict) -> dict:
        scores = self.engine.score_pairs(batch["query"].tolist(), batch["doc"].tolist())
        return {**batch, "score": scores}


def test_map_batches_class_scores_like_one_engine_call(tiny_bi_dir):
    rows = sample_rows(2)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("qid", "query", "doc_id", "doc")}
    scorer = ScoreRows(tiny_bi_dir)
    halves = [scorer({k: v[s] for k, v in batch.items()}) for s in (slice(0, 7), slice(7, None))]
    whole = scorer(batch)
    assert np.concatenate([h["score"] for h in halves]).tolist() == pytest.approx(whole["score"].tolist(), abs=1e-6)
    assert list(whole["qid"]) == [r["qid"] for r in rows] and len(whole["score"]) == len(rows)
