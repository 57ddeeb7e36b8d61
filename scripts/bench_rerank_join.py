"""Memory and time of the reranking join on a generated corpus of millions of documents.

    python scripts/bench_rerank_join.py [--docs 2000000] [--queries 1000] [--depth 100]
                                        [--workdir bench_out/rerank_join] [--out bench_out/rerank_join.json]

Generates a BEIR-layout corpus (`_id`, `title`, `text`: 40-80 words from the sample's
vocabulary, ~0.5 KB a document), a queries file and a TREC run of `--depth` random candidates
per query, then measures, each in a fresh process (peak RSS = ru_maxrss of that process):

1. `join, index built`: `RerankReader` over the three files with an empty index cache: it
   scans the corpus once to build the on-disk index, then hands out every joined chunk;
2. `join, index cached`: the same with the index from step 1's cache;
3. `dict corpus (BEIR loader)`: the corpus read into a dict of id -> {title, text}, which is
   what `beir.datasets.data_loader.GenericDataLoader` does, and the same join done from it: the
   memory the on-disk index avoids.

Prints a table and writes JSON (with the CPU it ran on). Nothing here needs paddle.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.common import cpu_info, read_pairs, write_json  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "pairs.tsv"

JOIN = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.io.rerank import RerankReader, RerankSources
t = time.perf_counter()
reader = RerankReader(RerankSources(Path({q!r}), Path({c!r}), Path({r!r}), {depth}), chunk_rows=2048,
                      index_cache=Path({cache!r}))
rows = rejects = 0
first = None
for chunk, rej in reader.chunks():
    if first is None:
        first = time.perf_counter() - t
    rows += len(chunk) if chunk is not None else 0
    rejects += len(rej)
print(rows, rejects, time.perf_counter() - t, first, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

DICT_JOIN = """
import json, resource, sys, time
t = time.perf_counter()
corpus = {{}}
with open({c!r}, encoding="utf-8") as f:
    for line in f:
        o = json.loads(line)
        corpus[o["_id"]] = {{"title": o.get("title", ""), "text": o.get("text", "")}}
queries = {{}}
with open({q!r}, encoding="utf-8") as f:
    for line in f:
        o = json.loads(line)
        queries[o["_id"]] = o["text"]
first = time.perf_counter() - t
rows = 0
with open({r!r}, encoding="utf-8") as f:
    for line in f:
        q, _, d, _, _, _ = line.split()
        pair = (queries[q], (corpus[d]["title"] + " " + corpus[d]["text"]).strip())
        rows += 1
print(rows, 0, time.perf_counter() - t, first, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_data(work: Path, docs: int, queries: int, depth: int, seed: int = 0) -> dict:
    words = sorted({w for d in read_pairs(SAMPLE)["doc"] for w in d.split() if w.isalpha()})
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    corpus, qfile, run = work / "corpus.jsonl", work / "queries.jsonl", work / "run.trec"
    if not corpus.exists() or sum(1 for _ in open(corpus, "rb")) != docs:
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(docs):
                text = " ".join(rng.choices(words, k=rng.randint(40, 80)))
                f.write(json.dumps({"_id": f"doc{i}", "title": " ".join(rng.choices(words, k=3)), "text": text}) + "\n")
    with open(qfile, "w", encoding="utf-8") as f:
        for i in range(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(words, k=8))}) + "\n")
    with open(run, "w", encoding="utf-8") as f:
        for i in range(queries):
            for rank, d in enumerate(rng.sample(range(docs), depth), 1):
                f.write(f"q{i} Q0 doc{d} {rank} {depth - rank + 0.5} bench\n")
    return {"docs": docs, "queries": queries, "candidates": queries * depth,
            "corpus_bytes": corpus.stat().st_size, "corpus": str(corpus), "queries_file": str(qfile), "run": str(run)}


def measure(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    rows, rejects, seconds, first, rss_kb = out
    return {"rows": int(rows), "rejects": int(rejects), "seconds": float(seconds), "first_chunk_seconds": float(first),
            "peak_rss_mb": int(rss_kb) / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "rerank_join")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "rerank_join.json")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    data = make_data(args.workdir, args.docs, args.queries, args.depth)
    data["generate_seconds"] = time.perf_counter() - t
    cache = args.workdir / "index-cache"
    for f in cache.glob("*"):
        f.unlink()
    fmt = dict(root=str(ROOT), q=data["queries_file"], c=data["corpus"], r=data["run"], depth=None, cache=str(cache))
    cases = {
        "join, index built": measure(JOIN.format(**fmt)),
        "join, index cached": measure(JOIN.format(**fmt)),
        "dict corpus (BEIR loader)": measure(DICT_JOIN.format(**fmt)),
    }
    index_bytes = sum(f.stat().st_size for f in cache.glob("*.npz"))
    result = {"cpu": cpu_info(), "data": data, "index_bytes": index_bytes, "cases": cases}

    print(f"CPU: {result['cpu']['model']} ({result['cpu']['cores']} cores); corpus {args.docs:,} docs "
          f"({data['corpus_bytes'] / 1e6:.0f} MB), {data['candidates']:,} candidates; index {index_bytes / 1e6:.1f} MB")
    print(f"{'case':28} {'rows':>9} {'seconds':>8} {'to 1st chunk':>13} {'peak RSS MB':>12}")
    for name, c in cases.items():
        print(f"{name:28} {c['rows']:>9,} {c['seconds']:>8.1f} {c['first_chunk_seconds']:>13.1f} {c['peak_rss_mb']:>12.0f}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
