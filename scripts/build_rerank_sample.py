#!/usr/bin/env python3
"""Build the embedded reranking sample (data/rerank/) from the embedded pair sample.

The pairs of `data/sample/pairs.tsv` (Python standard-library docstrings, PSF License; see
data/sample/SOURCE.txt) are laid out the way retrieval benchmarks ship them, so the reranking
layouts can be run end to end on data the project may redistribute:

- BEIR layout in `data/rerank/`: `corpus.jsonl` (`_id` = doc_id, `title` = the documented
  object's module name, `text` = the doc), `queries.jsonl` (`_id`, `text`), `qrels/test.tsv`
  (`query-id  corpus-id  score`, every judged pair, 0 included);
- MS MARCO layout in `data/rerank/msmarco/`: `collection.tsv` and `queries.tsv` (id<TAB>text, no
  header; the doc text without a title, as MS MARCO passages have none), `qrels.tsv` (TREC qrels);
- candidates of both: `bm25.trec`, a TREC run of BM25 (k1 1.2, b 0.75, lower-cased alphanumeric
  words) over the WHOLE corpus, the top `--depth` documents per query. So, as in a real
  reranking run, the candidates hold unjudged documents (never labelled for that query) and miss
  some relevant ones (which only the qrels know).

Deterministic: the same pairs.tsv gives the same bytes (ties in BM25 by doc_id).

Usage::

    python scripts/build_rerank_sample.py [--pairs data/sample/pairs.tsv] [--out data/rerank] [--depth 30]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = re.compile(r"[a-z0-9]+")
K1, B = 1.2, 0.75


def read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def bm25_run(queries: dict[str, str], docs: dict[str, str], depth: int) -> list[tuple[str, str, int, float]]:
    doc_tokens = {d: TOKEN.findall(t.lower()) for d, t in docs.items()}
    df = collections.Counter(w for toks in doc_tokens.values() for w in set(toks))
    n, avgdl = len(docs), sum(map(len, doc_tokens.values())) / len(docs)
    tfs = {d: collections.Counter(toks) for d, toks in doc_tokens.items()}
    run = []
    for qid, text in queries.items():
        words = set(TOKEN.findall(text.lower()))
        scores = []
        for d, tf in tfs.items():
            s = 0.0
            for w in words:
                if tf[w]:
                    idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                    s += idf * tf[w] * (K1 + 1) / (tf[w] + K1 * (1 - B + B * len(doc_tokens[d]) / avgdl))
            if s > 0:
                scores.append((round(s, 4), d))
        scores.sort(key=lambda x: (-x[0], x[1]))
        run += [(qid, d, rank, s) for rank, (s, d) in enumerate(scores[:depth], 1)]
    return run


def write_jsonl(path: Path, objs: list[dict]) -> None:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=Path, default=ROOT / "data" / "sample" / "pairs.tsv")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "rerank")
    p.add_argument("--depth", type=int, default=30, help="BM25 candidates per query")
    args = p.parse_args(argv)

    pairs = read_pairs(args.pairs)
    queries = {r["qid"]: r["query"] for r in pairs}
    docs = {r["doc_id"]: r["doc"] for r in pairs}
    judged = [(r["qid"], r["doc_id"], int(r["label"])) for r in pairs]
    run = bm25_run(queries, docs, args.depth)

    out, ms = args.out, args.out / "msmarco"
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    ms.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", [{"_id": d, "title": d.rsplit(".", 1)[0], "text": t} for d, t in docs.items()])
    write_jsonl(out / "queries.jsonl", [{"_id": q, "text": t} for q, t in queries.items()])
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{y}\n" for q, d, y in judged), encoding="utf-8")
    (ms / "collection.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()), encoding="utf-8")
    (ms / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()), encoding="utf-8")
    (ms / "qrels.tsv").write_text("".join(f"{q} 0 {d} {y}\n" for q, d, y in judged), encoding="utf-8")
    trec = "".join(f"{q} Q0 {d} {r} {s} bm25\n" for q, d, r, s in run)
    (out / "bm25.trec").write_text(trec, encoding="utf-8")  # the candidates of both layouts

    label = {(q, d): y for q, d, y in judged}
    in_run = collections.Counter("judged" if (q, d) in label else "unjudged" for q, d, _, _ in run)
    relevant = {(q, d) for (q, d), y in label.items() if y > 0}
    found = sum((q, d) in relevant for q, d, _, _ in run)
    print(f"queries {len(queries)}, corpus {len(docs)} docs, qrels {len(judged)} judged pairs "
          f"({len(relevant)} relevant)")
    print(f"bm25.trec: {len(run)} candidates (depth {args.depth}): {in_run['judged']} judged, "
          f"{in_run['unjudged']} unjudged; {found} of the {len(relevant)} relevant pairs retrieved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
