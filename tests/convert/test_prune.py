"""Vocabulary pruning (issue 5): on the data a model was pruned for, the pruned model's scores
equal the full model's (max abs difference <= 1e-6, identical ranking); text outside that data
is scored with [UNK] for the missing tokens, counted and reported; a map that does not belong
to its model is refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.convert import ConversionError, convert
from pipeline.engine.modeldir import ModelDirError, load_model_info, sha256_file
from pipeline.convert.prune import SPECIAL_TOKENS, prune_vocab
from pipeline.engine.tokenizer import WordPieceTokenizer, read_vocab
from tests.sample_data import sample_rows as _sample_rows, write_tsv as _write_tsv

TOLERANCE = 1e-6


def _run(data: Path, model: Path, out: Path, *extra: str) -> dict:
    assert main(["run", str(data), "--model", str(model), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _scores(out: Path) -> np.ndarray:
    return np.array([float(line.split("\t")[2]) for line in (out / "predictions.tsv").read_text().splitlines()])


def _ranking(out: Path) -> list[list[str]]:
    """qid, doc_id, rank of ranked.tsv (the order, without the scores)."""
    return [line.split("\t")[:3] for line in (out / "ranked.tsv").read_text().splitlines()]


def _assert_same_results(full: Path, pruned: Path) -> None:
    s_full, s_pruned = _scores(full), _scores(pruned)
    assert len(s_full) == len(s_pruned) > 0
    assert np.max(np.abs(s_full - s_pruned)) <= TOLERANCE
    assert np.std(s_full) > 1e-4  # the comparison would notice a constant output
    assert _ranking(full) == _ranking(pruned)


def _prune_cli(model: Path, data: Path, out: Path, *extra: str) -> Path:
    assert main(["prune-vocab", str(model), "--data", str(data), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def data_a(tmp_path_factory) -> Path:
    return _write_tsv(tmp_path_factory.mktemp("prune-data") / "a.tsv", _sample_rows(6))


def _kept_set(info, data_rows: list[dict]) -> set[int]:
    """The kept ids, computed here without the pruning code: whole texts, full tokenizer, specials."""
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    vocab = read_vocab(info.vocab_file)
    texts = [r["query"] for r in data_rows] + [r["doc"] for r in data_rows]
    ids = {t for seq in tok.token_ids(texts, 10**6) for t in seq}
    return ids | {vocab[t] for t in SPECIAL_TOKENS if t in vocab}


@pytest.mark.parametrize("mode", ["cross", "bi"])
def test_pruned_random_model_scores_equal_full(mode, tiny_cross_dir, tiny_bi_dir, data_a, tmp_path):
    src = tiny_cross_dir if mode == "cross" else tiny_bi_dir
    pruned = _prune_cli(src, data_a, tmp_path / "pruned")
    full_report = _run(data_a, src, tmp_path / "full", "--workers", "0")
    report = _run(data_a, pruned, tmp_path / "out", "--workers", "1")  # the id map reaches worker processes
    _assert_same_results(tmp_path / "full", tmp_path / "out")
    assert report["tokens"]["unknown_tokens"] == 0
    assert report["tokens"]["real"] == full_report["tokens"]["real"]

    # model.json records the pruning; the directory keeps the full vocab and adds the map
    meta = json.loads((pruned / "model.json").read_text())
    p = meta["pruning"]
    src_info, info = load_model_info(src), load_model_info(pruned)
    kept = _kept_set(src_info, _sample_rows(6))
    assert p["source_params_sha256"] == sha256_file(src / "inference.pdiparams")
    assert p["source_path"] == str(src.resolve())
    assert p["ids_kept"] == len(kept) == meta["architecture"]["vocab_size"] == info.vocab_size
    assert p["source_vocab_size"] == src_info.vocab_size and p["keep_top"] == 0
    assert p["data"] == [{"file": str(data_a.resolve()), "sha256": sha256_file(data_a)}]
    assert p["map_sha256"] == sha256_file(pruned / p["map_file"])
    assert (pruned / "vocab.txt").read_bytes() == (src / "vocab.txt").read_bytes()
    id_map = np.load(pruned / "id_map.npy")
    assert id_map.dtype == np.int32 and len(id_map) == src_info.vocab_size
    kept_ids = np.array(sorted(kept))
    assert np.array_equal(id_map[kept_ids], np.arange(len(kept_ids)))  # kept ids keep their order
    unk = read_vocab(src / "vocab.txt")["[UNK]"]
    others = np.setdiff1d(np.arange(len(id_map)), kept_ids)
    assert np.all(id_map[others] == id_map[unk])
    assert (pruned / "inference.pdiparams").stat().st_size < (src / "inference.pdiparams").stat().st_size


def test_keep_top_keeps_the_first_ids(tiny_bi_dir, data_a, tmp_path):
    pruned = prune_vocab(tiny_bi_dir, [data_a], tmp_path / "p", keep_top=2000)
    id_map = np.load(pruned / "id_map.npy")
    assert np.array_equal(id_map[:2000], np.arange(2000))
    assert json.loads((pruned / "model.json").read_text())["pruning"]["keep_top"] == 2000


def test_map_that_does_not_belong_is_refused(tiny_cross_dir, data_a, tmp_path, capsys):
    pruned = prune_vocab(tiny_cross_dir, [data_a], tmp_path / "p")
    id_map = np.load(pruned / "id_map.npy")
    a, b = np.flatnonzero(id_map != id_map[100])[:2]
    id_map[[a, b]] = id_map[[b, a]]  # still a valid-looking map, but not the recorded one
    np.save(pruned / "id_map.npy", id_map)
    with pytest.raises(ModelDirError, match="does not belong to this pruned model.*prune-vocab"):
        load_model_info(pruned)
    assert main(["run", str(data_a), "--model", str(pruned), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "id_map.npy" in capsys.readouterr().err
    (pruned / "id_map.npy").unlink()
    with pytest.raises(ModelDirError, match="id_map.npy is missing"):
        load_model_info(pruned)


def test_refuses_to_overwrite_without_force(tiny_bi_dir, data_a, tmp_path, capsys):
    out = prune_vocab(tiny_bi_dir, [data_a], tmp_path / "p")
    before = (out / "model.json").read_text()
    with pytest.raises(ConversionError, match="--force"):
        prune_vocab(tiny_bi_dir, [data_a], out)
    assert main(["prune-vocab", str(tiny_bi_dir), "--data", str(data_a), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "model.json").read_text() == before
    with pytest.raises(ConversionError, match="already pruned"):
        prune_vocab(out, [data_a], tmp_path / "q")
    prune_vocab(tiny_bi_dir, [data_a], out, force=True, keep_top=10)
    assert json.loads((out / "model.json").read_text())["pruning"]["keep_top"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left


@pytest.fixture(scope="module")
def ernie_checkpoint(tmp_path_factory, minilm_src) -> Path:
    """A tiny random ERNIE 3.0-style model in PaddleNLP layout (task-type embeddings, 2 classes)
    over the MiniLM vocab, so the sample's English tokenizes into real word pieces."""
    T = pytest.importorskip("paddlenlp.transformers")
    import paddle

    paddle.seed(11)
    vocab = sum(1 for _ in open(minilm_src / "vocab.txt", encoding="utf-8"))
    cfg = T.ErnieConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, type_vocab_size=4, use_task_id=True, task_type_vocab_size=3,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=2)
    ref = T.ErnieForSequenceClassification(cfg)
    ckpt = tmp_path_factory.mktemp("ernie") / "ckpt"
    ckpt.mkdir()
    state = ref.state_dict()
    state["classifier.weight"] = state["classifier.weight"] * 50  # else the scores are nearly constant
    paddle.save(state, str(ckpt / "model_state.pdparams"))
    (ckpt / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    shutil.copyfile(minilm_src / "vocab.txt", ckpt / "vocab.txt")
    return ckpt


@pytest.mark.parametrize("mode", ["cross", "bi"])
def test_pruned_paddlenlp_ernie_scores_equal_full(mode, ernie_checkpoint, data_a, tmp_path):
    src = convert(ernie_checkpoint, tmp_path / "full-model", mode=mode)
    meta = json.loads((src / "model.json").read_text())
    assert meta["source"]["layout"] == "paddlenlp" and meta["architecture"]["task_type_vocab_size"] == 3
    pruned = prune_vocab(src, [data_a], tmp_path / "pruned")
    _run(data_a, src, tmp_path / "full", "--workers", "0")
    _run(data_a, pruned, tmp_path / "out", "--workers", "0")
    _assert_same_results(tmp_path / "full", tmp_path / "out")


def test_pruned_default_model_scores_equal_full_on_sample(minilm_dir, tmp_path):
    data = _write_tsv(tmp_path / "sample10.tsv", _sample_rows(10))
    pruned = _prune_cli(minilm_dir, data, tmp_path / "pruned")
    _run(data, minilm_dir, tmp_path / "full", "--workers", "0")
    report = _run(data, pruned, tmp_path / "out", "--workers", "0")
    _assert_same_results(tmp_path / "full", tmp_path / "out")
    assert report["tokens"]["unknown_tokens"] == 0
    assert report["model"]["pruned_ids_kept"] < load_model_info(minilm_dir).vocab_size / 5


def test_text_outside_the_pruning_data_counts_unknown_tokens(tiny_cross_dir, data_a, tmp_path, capsys):
    pruned = prune_vocab(tiny_cross_dir, [data_a], tmp_path / "p")
    rows = _sample_rows(12)[-80:]
    rows[0] = {**rows[0], "query": "quokkas and axolotls photosynthesize zucchini"}
    data_b = _write_tsv(tmp_path / "b.tsv", rows)
    capsys.readouterr()
    report = _run(data_b, pruned, tmp_path / "out", "--workers", "1")
    captured = capsys.readouterr()
    assert report["rows"] == {"read": len(rows), "scored": len(rows), "rejected": 0}

    info = load_model_info(tiny_cross_dir)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    enc = tok.encode_pairs([r["query"] for r in rows], [r["doc"] for r in rows], info.max_seq_len)
    kept = _kept_set(info, _sample_rows(6))
    expected = sum(1 for t in enc.ids.flat.tolist() if t not in kept)
    assert expected > 0
    assert report["tokens"]["unknown_tokens"] == expected
    assert f"{expected} outside the pruned vocab" in captured.out
    assert f"warning: {expected} tokens are outside the pruned vocabulary" in captured.err


def test_pretokenized_input_is_mapped_the_same_way(tiny_cross_dir, data_a, tmp_path):
    pruned = prune_vocab(tiny_cross_dir, [data_a], tmp_path / "p")
    info = load_model_info(tiny_cross_dir)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    rows = _sample_rows(2)  # within the pruning data
    enc = tok.encode_pairs([r["query"] for r in rows], [r["doc"] for r in rows], info.max_seq_len)
    kept = _kept_set(info, _sample_rows(6))
    outside = next(i for i in range(2000, info.vocab_size) if i not in kept)
    lines = [{"qid": r["qid"], "doc_id": r["doc_id"], "label": int(r["label"]),
              "input_ids": enc.ids[i].tolist(), "token_type_ids": enc.types[i].tolist()} for i, r in enumerate(rows)]
    extra = dict(lines[0], doc_id="extra", input_ids=lines[0]["input_ids"][:-1] + [outside, tok.sep_id],
                 token_type_ids=lines[0]["token_type_ids"] + [1])
    pre = tmp_path / "pre.jsonl"
    pre.write_text("".join(json.dumps(x) + "\n" for x in lines + [extra]))

    full_report = _run(pre, tiny_cross_dir, tmp_path / "full", "--workers", "0")
    report = _run(pre, pruned, tmp_path / "out", "--workers", "0")
    assert full_report["rows"]["scored"] == report["rows"]["scored"] == len(lines) + 1
    assert report["tokens"]["unknown_tokens"] == 1
    s_full, s_pruned = _scores(tmp_path / "full"), _scores(tmp_path / "out")
    assert np.max(np.abs(s_full[:-1] - s_pruned[:-1])) <= TOLERANCE  # kept ids: unchanged
    # the text file with the same pairs gives the pruned model the same ids, hence the same scores
    text = _write_tsv(tmp_path / "text.tsv", rows)
    _run(text, pruned, tmp_path / "text-out", "--workers", "0")
    assert np.array_equal(_scores(tmp_path / "text-out"), s_pruned[:-1])
    # pre-tokenized data can be pruned for as well: its ids are kept as they are
    pruned_pre = prune_vocab(tiny_cross_dir, [pre], tmp_path / "p-pre")
    assert _run(pre, pruned_pre, tmp_path / "pre-out", "--workers", "0")["tokens"]["unknown_tokens"] == 0
    assert np.max(np.abs(_scores(tmp_path / "pre-out") - s_full)) <= TOLERANCE
