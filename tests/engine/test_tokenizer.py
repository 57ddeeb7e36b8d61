"""Tokenization: ids identical to PaddleNLP's ErnieTokenizer (the reference), pair assembly and
truncation rules, long-text handling, and the ragged containers."""

import random

import numpy as np
import pytest

from pipeline.engine.modeldir import TokenizerSettings
from pipeline.engine.tokenizer import Encoded, Ragged, WordPieceTokenizer, assemble_pairs, fit_pretokenized, longest_first

MIXED = [
    "百度的ERNIE模型在中文任务上表现很好。",
    "Hello, World! Naïve café résumé — déjà vu.",
    "如何用Python读取CSV文件？ pandas.read_csv(path, sep='\\t')",
    "   leading and trailing spaces   ",
    "数字123和English混合，以及标点！？",
    "URL: https://example.com/a?b=c&d=e#frag",
    "emoji 😀 and symbols ∑ ∞ ≠ → ©",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "ＦＵＬＬＷＩＤＴＨ ｃｈａｒａｃｔｅｒｓ and half-width",
    "tab\tseparated\nnew line\r\ncarriage",
    "日本語のテキストと한국어 텍스트",
    "",
]


def _corpus(n=400, seed=0):
    """Mixed Chinese/English texts, built deterministically from pieces."""
    rng = random.Random(seed)
    words = ("ranking search engine 搜索 排序 模型 推理 速度 Paddle ERNIE transformer's "
             "inference, speed! 中国 北京 query-document pairs (graded) 2026 3.14 naïve "
             "CAFÉ 文本 相关性 relevance #tag @user e-mail").split()
    out = list(MIXED)
    while len(out) < n:
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
    return out


@pytest.fixture(scope="module")
def tok(minilm_src):
    return WordPieceTokenizer(minilm_src / "vocab.txt", TokenizerSettings(lowercase=True))


@pytest.fixture(scope="module")
def reference(minilm_src):
    T = pytest.importorskip("paddlenlp.transformers")
    return T.ErnieTokenizer(vocab_file=str(minilm_src / "vocab.txt"), do_lower_case=True)


def test_single_ids_identical_to_paddlenlp(tok, reference):
    texts = _corpus()
    ours = tok.encode_single(texts, 512)
    for i, text in enumerate(texts):
        want = reference(text)["input_ids"]
        assert list(ours.ids[i]) == want, text


def test_pair_ids_and_types_identical_to_paddlenlp(tok, reference):
    texts = _corpus(300, seed=1)
    qs, ds = texts[:150], texts[150:]
    for max_len in (512, 24, 9):
        ours = tok.encode_pairs(qs, ds, max_len)
        for i, (q, d) in enumerate(zip(qs, ds)):
            want = reference(q, d, max_length=max_len, truncation="longest_first")
            assert list(ours.ids[i]) == want["input_ids"], (q, d, max_len)
            assert list(ours.types[i]) == want["token_type_ids"], (q, d, max_len)


def test_longest_first_closed_form_equals_the_loop():
    for a in range(0, 25):
        for b in range(0, 25):
            for budget in range(0, 30):
                x, y = a, b
                while x + y > budget:
                    if x > y:
                        x -= 1
                    else:
                        y -= 1
                assert longest_first(a, b, budget) == (x, y), (a, b, budget)


def test_long_text_is_cut_without_changing_its_first_tokens(tok):
    words = [f"word{i}" for i in range(300_000)]
    text = " ".join(words)  # about 2.6 MB
    assert len(text) > 1_000_000
    got = tok.token_ids([text], 100)[0]
    want = tok.token_ids([" ".join(words[:200])], 100)[0]
    assert got == want and len(got) == 100
    # a text that is mostly spaces after the cut point still yields the right tokens
    sparse = "alpha" + " " * 50_000 + "beta gamma"
    assert tok.token_ids([sparse], 5)[0] == tok.token_ids(["alpha beta gamma"], 5)[0]


def test_encode_single_adds_specials_and_truncates(tok):
    enc = tok.encode_single(["one two three four five"], 4)
    assert list(enc.ids[0])[0] == tok.cls_id and list(enc.ids[0])[-1] == tok.sep_id
    assert len(enc.ids[0]) == 4 and set(enc.types[0].tolist()) == {0}


def test_assemble_pairs_layout():
    enc = assemble_pairs([[5, 6, 7]], [[8, 9]], 10, cls_id=1, sep_id=2)
    assert enc.ids[0].tolist() == [1, 5, 6, 7, 2, 8, 9, 2]
    assert enc.types[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_fit_pretokenized_cuts_and_ends_in_sep():
    enc, cut = fit_pretokenized([[1, 5, 6, 2, 7, 8, 9, 2], [1, 5, 2]], [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0]], 6, sep_id=2)
    assert cut == 1
    assert enc.ids[0].tolist() == [1, 5, 6, 2, 7, 2] and enc.types[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert enc.ids[1].tolist() == [1, 5, 2]


def test_ragged_roundtrip_concat_take():
    a = Ragged.from_lists([[1, 2], [], [3]])
    b = Ragged.from_lists([[4, 5, 6]])
    c = Ragged.concat([a, b])
    assert [c[i].tolist() for i in range(len(c))] == [[1, 2], [], [3], [4, 5, 6]]
    assert c.lengths.tolist() == [2, 0, 1, 3]
    assert [x.tolist() for x in (c.take(np.array([3, 0]))[i] for i in range(2))] == [[4, 5, 6], [1, 2]]
    e = Encoded.concat([Encoded(a, a), Encoded(b, b)])
    assert len(e) == 4
