"""generation_metrics against values computed another way: sacrebleu's sentence-level scores,
a perfect match, ROUGE-L LCS by hand, and duplicated references for the ragged case."""

import pytest
import sacrebleu

from pipeline.tasks.text_metrics import generation_metrics

HYP = "the quick brown fox jumps over the dog"
REF = "the quick brown fox jumped over the lazy dog"


def test_one_row_corpus_equals_sentence_scores():
    # Every n-gram order up to 4 has a match, so BLEU's effective order plays no part.
    m = generation_metrics([HYP], [[REF]])
    assert m["rows_with_reference"] == 1
    assert m["bleu"] == pytest.approx(sacrebleu.sentence_bleu(HYP, [REF]).score, abs=1e-9)
    assert m["chrf"] == pytest.approx(sacrebleu.sentence_chrf(HYP, [REF]).score, abs=1e-9)
    assert 0 < m["bleu"] < 100 and 0 < m["chrf"] < 100
    assert m["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in m["bleu_signature"]
    assert m["chrf_signature"].startswith("nrefs:1|") and "version:2.6.0" in m["chrf_signature"]


def test_perfect_match_gives_100_and_1():
    hyps = ["Put an item into the queue without blocking", "Return the number of items in the queue"]
    m = generation_metrics(hyps, [[h] for h in hyps])
    assert m == {"rows_with_reference": 2, "bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0),
                 "rouge_l": pytest.approx(1.0), "bleu_signature": m["bleu_signature"],
                 "chrf_signature": m["chrf_signature"]}
    assert all(isinstance(m[k], float) for k in ("bleu", "chrf", "rouge_l"))


def test_rouge_l_is_the_lcs_f1_by_hand():
    # ref: the cat sat on the mat / hyp: the cat lay on a mat -> LCS "the cat on mat" = 4 tokens,
    # P = 4/6, R = 4/6, F1 = 2/3.
    m = generation_metrics(["the cat lay on a mat"], [["the cat sat on the mat"]])
    assert m["rouge_l"] == pytest.approx(2 / 3)
    # ref: a b c d / hyp: a c e -> LCS "a c" = 2, P = 2/3, R = 2/4, F1 = 4/7.
    # Lowercased and punctuation-split by rouge-score's tokenizer.
    m = generation_metrics(["A, c. e!"], [["a b c d"]])
    assert m["rouge_l"] == pytest.approx(4 / 7)


def test_rouge_l_takes_the_best_reference_and_averages_rows():
    m = generation_metrics(["the cat lay on a mat", "a b c d"],
                           [["x y z", "the cat sat on the mat"], ["a b c d"]])
    assert m["rouge_l"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_ragged_references_equal_duplicated_references():
    # A row's second reference repeated changes neither BLEU (same clipped counts, same closest
    # length) nor chrF (best reference per row), so None-padding must give the same scores.
    hyps = [HYP, "return the number of items", "put an item into the queue"]
    ragged = [[REF, "a quick brown fox jumps over a dog"], ["return the number of items in the queue"],
              ["put an item into the queue without blocking", "add an item to the queue"]]
    m = generation_metrics(hyps, ragged)
    padded = [refs + [refs[0]] * (2 - len(refs)) for refs in ragged]
    streams = [list(s) for s in zip(*padded)]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score, abs=1e-9)
    assert m["bleu_signature"].startswith("nrefs:var|") and m["chrf_signature"].startswith("nrefs:var|")
    assert m["rows_with_reference"] == 3


def test_rows_without_reference_are_left_out():
    hyps = [HYP, "anything at all", "the cat lay on a mat", "blank reference"]
    refs = [[REF], [], ["the cat sat on the mat"], ["", "   "]]
    m = generation_metrics(hyps, refs)
    only = generation_metrics([HYP, "the cat lay on a mat"], [[REF], ["the cat sat on the mat"]])
    assert m["rows_with_reference"] == 2
    assert m == only


def test_no_reference_gives_none():
    assert generation_metrics([], []) is None
    assert generation_metrics(["a", "b"], [[], [""]]) is None


def test_rouge_tokenizer_drops_non_ascii_but_chrf_does_not():
    m = generation_metrics(["日本語の文"], [["日本語の文"]])
    assert m["rouge_l"] == 0.0 and m["chrf"] == pytest.approx(100.0)


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        generation_metrics(["a", "b"], [["a"]])
