"""The model against independent references: a numpy forward pass written here from the
Hugging Face checkpoint (not through our converter's mapping), and PaddleNLP's ERNIE."""

import json
import math

import numpy as np
import pytest

from pipeline.engine.modeldir import load_model_info
from pipeline.engine.tokenizer import WordPieceTokenizer
from pipeline.engine.batching import Batch, pad_batch

TEXTS = [
    "how do I open a file for reading?",
    "Return the number of items in a container.",
    "Paddle Inference runs the exported ERNIE program with oneDNN kernels on the CPU.",
    "a",
    "深度学习模型的推理速度 matters for ranking 100,000 documents.",
]


def _ln(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf)


def numpy_bert_forward(w: dict, cfg: dict, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT encoder in float64 numpy, straight from the HF tensor names; returns hidden states."""
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in w.items()}
    B, S = ids.shape
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = H // nh
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(S)][None]
    x = x + w["embeddings.token_type_embeddings.weight"][types]
    x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    bias = (1.0 - mask[:, None, None, :]) * -1e4
    lin = lambda t, n: t @ w[f"{n}.weight"].T + w[f"{n}.bias"]  # noqa: E731 - torch [out, in]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, S, H)
        x = _ln(x + lin(ctx, f"{p}.attention.output.dense"), w[f"{p}.attention.output.LayerNorm.weight"],
                w[f"{p}.attention.output.LayerNorm.bias"])
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _ln(x + lin(h, f"{p}.output.dense"), w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"])
    return x


def _batch(tok, enc):
    batch = Batch(np.arange(len(enc)), int(enc.lengths.max()))
    return pad_batch(enc, batch, tok.pad_id)


def test_converted_minilm_matches_numpy_reference(minilm_src, minilm_dir):
    """all-MiniLM-L6-v2 through our converter + Paddle Inference == numpy forward, < 1e-4."""
    from safetensors.numpy import load_file

    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    info = load_model_info(minilm_dir)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    ids, types, mask = _batch(tok, tok.encode_single(TEXTS, 64))
    got = PaddlePredictor(info, PredictorSettings(threads=1)).run(ids, types, mask)

    cfg = json.loads((minilm_src / "config.json").read_text())
    hidden = numpy_bert_forward(load_file(str(minilm_src / "model.safetensors")), cfg, ids, types, mask)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    assert got.shape == (len(TEXTS), 384)
    assert np.max(np.abs(got - want)) < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit embeddings, as `run` assumes


# Paraphrase pairs (a_i, b_i): little word overlap, same meaning; every a_i is unrelated to every
# b_j, j != i. Measured with all-MiniLM-L6-v2 here: paraphrase cosines 0.58..0.97, unrelated
# -0.06..0.21, each sentence's paraphrase beats its best unrelated match by >= 0.37.
PARAPHRASES = [
    ("How do I open a file for reading in Python?", "What is the way to read a text file with Python?"),
    ("A cat is sleeping on the sofa.", "The kitten naps on the couch."),
    ("What is the capital city of France?", "Which city is the capital of France?"),
    ("Stock prices fell sharply on Monday.", "Shares dropped steeply at the start of the week."),
    ("He plays the guitar in a rock band.", "The man is a guitarist in a rock group."),
    ("Heavy rain is expected tomorrow.", "The forecast says it will pour tomorrow."),
]
MIN_PARAPHRASE_COS, MAX_UNRELATED_COS, MIN_MARGIN = 0.5, 0.3, 0.25


def test_converted_minilm_embeds_paraphrases_closer_than_unrelated_sentences(minilm_dir):
    """The semantic check: the converted model, through Paddle Inference, puts each sentence
    nearest to its paraphrase, by a clear margin. A model that runs but has lost its meaning
    fails the thresholds (tried: token ids shifted by one give paraphrase cosines down to 0.27
    and unrelated up to 0.57; a permuted vocabulary 0.35 and 0.74)."""
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    info = load_model_info(minilm_dir)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    n = len(PARAPHRASES)
    texts = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
    emb = PaddlePredictor(info, PredictorSettings(threads=1)).run(*_batch(tok, tok.encode_single(texts, 64)))
    cos = emb[:n] @ emb[n:].T  # [i, j] = cos(a_i, b_j); unit embeddings
    paraphrase, unrelated = np.diag(cos), cos[~np.eye(n, dtype=bool)]
    assert paraphrase.min() > MIN_PARAPHRASE_COS, paraphrase
    assert unrelated.max() < MAX_UNRELATED_COS, cos
    for i in range(n):  # from both sides: a_i's nearest b is b_i, and b_i's nearest a is a_i
        assert cos[i, i] - np.delete(cos[i], i).max() > MIN_MARGIN, (PARAPHRASES[i], cos[i])
        assert cos[i, i] - np.delete(cos[:, i], i).max() > MIN_MARGIN, (PARAPHRASES[i], cos[:, i])


def test_cross_model_matches_numpy_reference(tiny_cross_dir, tmp_path):
    from safetensors.numpy import load_file

    from pipeline.engine.predictor import PaddlePredictor

    info = load_model_info(tiny_cross_dir)
    src = json.loads((tiny_cross_dir / "model.json").read_text())["source"]["path"]
    from pathlib import Path

    src = Path(src)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    enc = tok.encode_pairs(TEXTS, TEXTS[::-1], 48)
    ids, types, mask = _batch(tok, enc)
    got = PaddlePredictor(info).run(ids, types, mask)
    w = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    hidden = numpy_bert_forward(w, cfg, ids, types, mask)
    pooled = np.tanh(hidden[:, 0] @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
    want = (pooled @ w["classifier.weight"].T + w["classifier.bias"])[:, 0]
    assert got.shape == (len(TEXTS),)
    assert np.max(np.abs(got - want)) < 1e-4
    assert np.std(want) > 1e-3  # the check would notice a constant output


@pytest.fixture(scope="module")
def paddlenlp_transformers():
    return pytest.importorskip("paddlenlp.transformers")


def _random_inputs(vocab, B=3, S=9, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(B, S)).astype(np.int64)
    types = np.zeros((B, S), np.int64)
    mask = np.ones((B, S), np.float32)
    for i, n in enumerate([S, 5, 2][:B]):
        ids[i, n:] = 0  # [PAD]: PaddleNLP derives its mask from the pad id
        mask[i, n:] = 0
        types[i, n // 2:n] = 1
    return ids, types, mask


@pytest.mark.parametrize("use_task_id,num_labels", [(True, 2), (False, 1)])
def test_scorer_equals_paddlenlp_ernie(tmp_path, paddlenlp_transformers, use_task_id, num_labels):
    """Same random weights: our ErnieScorer (via the PaddleNLP converter) == PaddleNLP, < 1e-5,
    for the classification score and for the mean-pooled embedding."""
    import paddle

    from pipeline.convert.checkpoints import read_checkpoint
    from pipeline.convert.export import build_model

    T = paddlenlp_transformers
    paddle.seed(7)
    cfg = T.ErnieConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, type_vocab_size=4, use_task_id=use_task_id, task_type_vocab_size=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels)
    ref = T.ErnieForSequenceClassification(cfg)
    ref.eval()
    ckpt = tmp_path / "ernie"
    ckpt.mkdir()
    paddle.save(ref.state_dict(), str(ckpt / "model_state.pdparams"))
    (ckpt / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (ckpt / "vocab.txt").write_text("".join(f"[unused{i}]\n" for i in range(120)))

    read = read_checkpoint(ckpt)
    assert read.config["task_type_vocab_size"] == (3 if use_task_id else 0)
    ids, types, mask = _random_inputs(120)
    t = [paddle.to_tensor(a) for a in (ids, types, mask)]
    with paddle.no_grad():
        logits = ref(input_ids=t[0], token_type_ids=t[1]).numpy()
        seq = ref.ernie(input_ids=t[0], token_type_ids=t[1])[0].numpy()
        ours_cross = build_model(read.config, "cross", read.weights)(*t).numpy()
        ours_bi = build_model(read.config, "bi", read.weights)(*t).numpy()
    want_cross = logits[:, 0] if num_labels == 1 else np.exp(logits[:, 1]) / np.exp(logits).sum(1)
    assert np.max(np.abs(ours_cross - want_cross)) < 1e-5
    mean = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want_bi = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.max(np.abs(ours_bi - want_bi)) < 1e-5
