"""Small inputs cut from the embedded sample (data/sample/pairs.tsv), shared by the tests."""

import csv
from pathlib import Path

from pipeline.config import DEFAULT_INPUT

SAMPLE = DEFAULT_INPUT / "pairs.tsv"


def sample_rows(n_queries: int) -> list[dict]:
    """Every row of the sample's first `n_queries` queries."""
    with open(SAMPLE, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    qids = list(dict.fromkeys(r["qid"] for r in rows))[:n_queries]
    keep = set(qids)
    return [r for r in rows if r["qid"] in keep]


def write_tsv(path: Path, rows: list[dict], extra_lines: list[str] = ()) -> Path:
    cols = list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join(r[c] for c in cols) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path
