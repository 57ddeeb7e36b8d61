"""Reference-based metrics for generated text: corpus BLEU, corpus chrF and mean ROUGE-L F1.

No paddle here: plain `sacrebleu` (2.6.0) and `rouge-score` (0.1.2), pinned in requirements.txt.

Scales: BLEU and chrF are on sacrebleu's 0-100 scale; ROUGE-L is an F1 on 0-1.

Rows without a reference are left out of every metric. A row's references may number
differently from another row's ("ragged" references): sacrebleu 2.6 takes its references as
equal-length *streams* (stream k holds every row's k-th reference) and documents `None` as the
filler for a row that has fewer references (`Metric._cache_references`: "A particular reference
segment can be '' or `None` to allow the use of variable number of references per segment";
`None` entries are dropped, '' would count as an empty reference). So the streams are padded
with `None`, and the signatures then say `nrefs:var`.

ROUGE-L uses `rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)` and takes, per row, the
best F1 over that row's references (`score_multi`), then the mean over rows. rouge-score's
default tokenizer lowercases and keeps only ASCII letters and digits: every other character,
including non-ASCII letters (é, ß, Cyrillic, CJK…), is a separator and is dropped, so
"wörld" becomes the tokens "w" and "rld" and a text in a non-Latin script has no tokens at all
(ROUGE-L 0 for it). BLEU (tokenizer 13a) and chrF (characters) are not affected by this.
"""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF


def _usable(refs: Sequence[str | None] | None) -> list[str]:
    """A row's references minus missing (None) and blank ones: neither is a reference."""
    return [r for r in (refs or ()) if r is not None and r.strip()]


def generation_metrics(hypotheses: list[str], references: list[list[str]],
                       rouge_l: list[float | None] | None = None) -> dict | None:
    """Corpus BLEU and chrF (sacrebleu defaults, 0-100) and mean ROUGE-L F1 (0-1).

    `references[i]` holds the references of `hypotheses[i]`: any number of them, possibly none.
    Only rows with at least one (non-blank) reference count. Returns None when no row has one,
    else {"rows_with_reference", "bleu", "chrf", "rouge_l", "bleu_signature", "chrf_signature"}.
    `rouge_l`: `rouge_l_per_row(hypotheses, references)` when the caller has it already.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if rouge_l is not None and len(rouge_l) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(rouge_l)} ROUGE-L values")
    usable = list(map(_usable, references))
    rows = [(h, refs) for h, refs in zip(hypotheses, usable) if refs]
    if not rows:
        return None
    for h, _ in rows:
        if not isinstance(h, str):
            raise TypeError(f"a hypothesis must be a str, got {type(h).__name__}")
    hyps = [h for h, _ in rows]
    width = max(len(refs) for _, refs in rows)
    # sacrebleu's documented ragged layout: `width` streams, shorter rows padded with None.
    streams = [[refs[k] if k < len(refs) else None for _, refs in rows] for k in range(width)]

    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hyps, streams)
    chrf_score = chrf.corpus_score(hyps, streams)

    rouge = (rouge_l_per_row(hyps, [refs for _, refs in rows]) if rouge_l is None
             else [v for v, refs in zip(rouge_l, usable) if refs])

    return {"rows_with_reference": len(rows),
            "bleu": float(bleu_score.score),
            "chrf": float(chrf_score.score),
            "rouge_l": float(sum(rouge) / len(rouge)),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def rouge_l_per_row(hypotheses: list[str], references: list[list[str | None]]) -> list[float | None]:
    """ROUGE-L F1 of each hypothesis against its best-matching reference (`score_multi`); None
    for a row without a (non-blank) reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score_multi(refs, h)["rougeL"].fmeasure if refs else None
            for h, refs in zip(hypotheses, map(_usable, references))]
