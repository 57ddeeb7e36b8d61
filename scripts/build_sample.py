#!/usr/bin/env python3
"""Build the embedded sample ranking dataset from Python standard-library docstrings.

The sample is a graded query -> candidate-documents task made only from text the project may
redistribute: the docstrings of the Python 3.11 standard library (PSF License Version 2).

Construction (deterministic for a given Python version, ``--queries`` and ``--seed``):

1. Read the *source* of a fixed list of pure-Python stdlib modules (nothing is imported; the
   files are parsed with ``ast``) and collect the docstrings of public top-level functions,
   classes and methods of public classes.
2. Split each docstring into its summary (first paragraph) and its body (the rest). Doctest
   paragraphs (starting with ``>>>``) are dropped from the body, whitespace is collapsed and the
   body is cut to at most ``MAX_DOC_WORDS`` words at a sentence boundary (or a word boundary if
   that would keep less than half of them). A body needs at least ``MIN_DOC_WORDS`` words to
   become a document; bodies that occur more than once, or that start with a double quote (which
   default CSV readers take for a quoted field), are dropped everywhere.
3. A summary is a query if it is a single sentence of 4-25 words ending in a period, is not a
   signature line, is not generic and is distinct from every other summary. The trailing period is
   stripped.
4. Labels per query: 2 = the body of the same object; 1 = bodies of other objects of the same
   module (2-8 of them, uniformly); 0 = bodies from modules of unrelated families (never an
   object with the same short name, e.g. another ``read``) up to a total drawn uniformly in
   [10, 50]. Candidates are shuffled with a per-query seed.

The script also reports NDCG@10 (gain 2^label - 1) of BM25 over word overlap and of a random
ranking, as a cheap check that the task is neither trivial nor hopeless.

Usage::

    python scripts/build_sample.py --out data/sample/pairs.tsv [--queries 300] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import math
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass

BUILT_WITH = (3, 11, 7)  # the Python the committed sample was built with

MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 25
MIN_DOC_WORDS, MAX_DOC_WORDS = 12, 64
MIN_CANDIDATES, MAX_CANDIDATES = 10, 50
MIN_RELATED, MAX_RELATED = 2, 8
MAX_QUERIES_PER_MODULE = 8

# Pure-Python stdlib modules whose source is read. Names are the modules objects are defined in
# (e.g. posixpath and genericpath rather than os.path).
MODULES = """
abc argparse ast asyncio.base_events asyncio.events asyncio.locks asyncio.queues
asyncio.streams asyncio.subprocess asyncio.tasks asyncio.transports base64 bdb bisect bz2
calendar cmd code codecs codeop collections colorsys compileall concurrent.futures._base
concurrent.futures.process concurrent.futures.thread configparser contextlib copy copyreg
csv dataclasses datetime decimal difflib dis doctest email.charset email.feedparser
email.generator email.header email.headerregistry email.message email.parser email.policy
email.utils enum filecmp fileinput fnmatch fractions ftplib functools genericpath getopt
getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client
http.cookiejar http.cookies http.server imaplib importlib.abc importlib.metadata
importlib.resources importlib.util inspect ipaddress json json.decoder json.encoder keyword
linecache locale logging logging.config logging.handlers lzma mailbox mimetypes
modulefinder multiprocessing.connection multiprocessing.managers multiprocessing.pool
multiprocessing.process multiprocessing.queues multiprocessing.synchronize netrc numbers
opcode operator optparse pathlib pickle pickletools pkgutil platform plistlib poplib
posixpath pprint profile pstats py_compile pyclbr queue quopri random re reprlib
runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver
sqlite3.dbapi2 ssl stat statistics string stringprep struct subprocess symtable sysconfig
tabnanny tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback
tracemalloc types typing unittest.case unittest.loader unittest.main unittest.mock
unittest.result unittest.runner unittest.suite urllib.error urllib.parse urllib.request
urllib.response urllib.robotparser uuid warnings wave weakref webbrowser wsgiref.handlers
wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom.minidom
xml.dom.pulldom xml.etree.ElementTree xml.sax.handler xml.sax.saxutils xml.sax.xmlreader
xmlrpc.client xmlrpc.server zipapp zipfile zipimport zoneinfo
""".split()

# Modules that are never negatives (label 0) for each other because their APIs overlap in topic
# (same family = same top-level package, plus these groups).
RELATED_GROUPS = [
    {"posixpath", "genericpath", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp",
     "fileinput", "stat"},
    {"gzip", "bz2", "lzma", "zipfile", "tarfile", "zipimport", "zipapp", "shutil"},
    {"socket", "ssl", "selectors", "socketserver", "http", "urllib", "ftplib", "smtplib",
     "imaplib", "poplib", "xmlrpc", "wsgiref", "asyncio"},
    {"email", "mailbox", "smtplib", "imaplib", "poplib", "mimetypes", "quopri", "base64"},
    {"threading", "queue", "multiprocessing", "concurrent", "asyncio", "sched", "subprocess"},
    {"json", "pickle", "pickletools", "copyreg", "shelve", "plistlib", "tomllib", "csv",
     "configparser", "marshal", "xmlrpc"},
    {"xml", "html"},
    {"unittest", "doctest", "bdb", "trace", "traceback", "profile", "pstats", "timeit"},
    {"ast", "dis", "tokenize", "symtable", "pyclbr", "inspect", "code", "codeop", "opcode",
     "py_compile", "compileall", "modulefinder", "importlib", "pkgutil", "runpy", "zipimport",
     "keyword", "linecache", "tabnanny"},
    {"decimal", "fractions", "numbers", "statistics", "random", "secrets", "operator"},
    {"hashlib", "hmac", "secrets", "uuid"},
    {"datetime", "calendar", "zoneinfo", "locale", "time"},
    {"string", "textwrap", "re", "difflib", "stringprep", "codecs", "shlex", "reprlib",
     "pprint", "locale", "gettext"},
    {"functools", "operator", "collections", "heapq", "bisect", "copy", "types", "typing",
     "abc", "enum", "dataclasses", "contextlib", "weakref", "graphlib"},
    {"argparse", "optparse", "getopt", "cmd"},
    {"logging", "warnings"},
    {"sysconfig", "site", "platform"},
]

GENERIC_SUMMARIES = {
    "constructor", "initialize self", "initialise self", "create a new instance",
    "return str(self)", "return repr(self)", "implement the context manager protocol",
}

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")
SIGNATURE = re.compile(r"^[\w.]+\s*\(.*\)\s*(->|$)|->")
TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Entry:
    doc_id: str  # module.qualname
    module: str
    family: str
    short_name: str  # last qualname component, e.g. "read"
    summary: str  # the query text: summary sentence without its period ("" if unusable)
    body: str  # normalised, truncated body


def family_of(module: str) -> str:
    top = module.split(".")[0]
    return "os.path" if top in ("posixpath", "genericpath") else top


def related_families(family: str) -> set[str]:
    names = {family, "posixpath", "genericpath"} if family == "os.path" else {family}
    out = set(names)
    for group in RELATED_GROUPS:
        if names & group:
            out |= group
    return {"os.path" if n in ("posixpath", "genericpath") else n for n in out}


def source_path(module: str) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    base = os.path.join(stdlib, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    raise SystemExit(f"error: stdlib module {module!r} has no Python source under {stdlib}; "
                     "the sample cannot be rebuilt identically here")


def collapse(text: str) -> str:
    return " ".join(text.split())  # also removes tabs, CR, LF and other separators


def truncate_words(text: str, max_words: int) -> str:
    if len(text.split()) <= max_words:
        return text
    kept: list[str] = []
    n = 0
    for sentence in SENTENCE_END.split(text):
        w = len(sentence.split())
        if n + w > max_words:
            break
        kept.append(sentence)
        n += w
    if n >= max_words // 2:
        return " ".join(kept)
    return " ".join(text.split()[:max_words])


def split_docstring(doc: str) -> tuple[str, str]:
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    if not paragraphs:
        return "", ""
    summary = collapse(paragraphs[0])
    body_pars = [p for p in paragraphs[1:] if not p.lstrip().startswith(">>>")]
    body = truncate_words(collapse(" ".join(body_pars)), MAX_DOC_WORDS)
    return summary, body


def usable_summary(summary: str) -> str:
    """The query text for a summary, or "" when it is not a good query."""
    if not summary.endswith(".") or summary.endswith("..."):
        return ""
    if len(SENTENCE_END.split(summary)) != 1 or SIGNATURE.search(summary) or ">>>" in summary:
        return ""
    n = len(summary.split())
    if not MIN_QUERY_WORDS <= n <= MAX_QUERY_WORDS:
        return ""
    query = summary[:-1].rstrip()
    if query.lower() in GENERIC_SUMMARIES:
        return ""
    return query


def collect(module: str) -> list[Entry]:
    path = source_path(module)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    family = family_of(module)
    out: list[Entry] = []
    seen: set[str] = set()

    def add(qualname: str, node: ast.AST) -> None:
        if qualname in seen:  # first definition wins (e.g. platform-specific variants)
            return
        seen.add(qualname)
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            return
        summary, body = split_docstring(doc)
        # A field that starts with '"' is read as a quoted field by default CSV/TSV readers
        # (csv, pandas); leaving such texts out keeps the file safe to read with any of them.
        if len(body.split()) < MIN_DOC_WORDS or body.startswith('"'):
            return
        if summary.startswith('"'):
            summary = ""
        out.append(Entry(f"{module}.{qualname}", module, family, qualname.rsplit(".", 1)[-1],
                         usable_summary(summary), body))

    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, defs) and not node.name.startswith("_"):
            add(node.name, node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            add(node.name, node)
            for sub in node.body:
                if isinstance(sub, defs) and not sub.name.startswith("_"):
                    add(f"{node.name}.{sub.name}", sub)
    return out


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def ndcg_at_10(labels_in_rank_order: list[int], all_labels: list[int]) -> float:
    def dcg(ls: list[int]) -> float:
        return sum((2 ** l - 1) / math.log2(i + 2) for i, l in enumerate(ls[:10]))

    ideal = dcg(sorted(all_labels, reverse=True))
    return dcg(labels_in_rank_order) / ideal if ideal > 0 else 0.0


def main() -> None:
    if sys.flags.optimize >= 2:
        raise SystemExit("error: docstrings are stripped under -OO; run without it")
    ap = argparse.ArgumentParser(description="Build the sample ranking dataset from stdlib docstrings.")
    ap.add_argument("--out", required=True, help="output TSV path, e.g. data/sample/pairs.tsv")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = ap.parse_args()

    if sys.version_info[:2] != BUILT_WITH[:2]:
        print(f"warning: the sample was built with Python {'.'.join(map(str, BUILT_WITH))}; "
              f"this is {sys.version.split()[0]}, so the docstrings and the output will differ",
              file=sys.stderr)
    elif sys.version_info[:3] != BUILT_WITH:
        print(f"note: built with {'.'.join(map(str, BUILT_WITH))}, running "
              f"{sys.version.split()[0]}; patch releases may change a few docstrings",
              file=sys.stderr)
    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to overwrite it")

    # 1-2. Documents.
    entries = [e for m in sorted(set(MODULES)) for e in collect(m)]
    body_count = collections.Counter(e.body for e in entries)
    entries = [e for e in entries if body_count[e.body] == 1]
    entries.sort(key=lambda e: e.doc_id)
    assert len({e.doc_id for e in entries}) == len(entries)
    by_module: dict[str, list[Entry]] = collections.defaultdict(list)
    for e in entries:
        by_module[e.module].append(e)

    # 3. Queries: distinct, usable summaries of objects whose module has enough related docs.
    summary_count = collections.Counter(e.summary.lower() for e in entries if e.summary)
    eligible = [e for e in entries
                if e.summary and summary_count[e.summary.lower()] == 1
                and len(by_module[e.module]) - 1 >= MIN_RELATED]
    rng = random.Random(args.seed)
    order = eligible[:]
    rng.shuffle(order)
    chosen: list[Entry] = []
    per_module: collections.Counter[str] = collections.Counter()
    for e in order:
        if len(chosen) == args.queries:
            break
        if per_module[e.module] < MAX_QUERIES_PER_MODULE:
            chosen.append(e)
            per_module[e.module] += 1
    if len(chosen) < args.queries:
        raise SystemExit(f"error: only {len(chosen)} usable queries for --queries {args.queries}")

    # 4. Candidates and labels.
    rows: list[tuple[str, str, str, str, int]] = []
    groups: list[list[tuple[Entry, int]]] = []
    for i, q in enumerate(chosen, 1):
        qrng = random.Random(f"{args.seed}:{q.doc_id}")
        total = qrng.randint(MIN_CANDIDATES, MAX_CANDIDATES)
        pool1 = [e for e in by_module[q.module] if e.doc_id != q.doc_id]
        n1 = qrng.randint(MIN_RELATED, min(MAX_RELATED, len(pool1)))
        related = related_families(q.family)
        pool0 = [e for e in entries if e.family not in related and e.short_name != q.short_name]
        cands = ([(q, 2)] + [(e, 1) for e in qrng.sample(pool1, n1)]
                 + [(e, 0) for e in qrng.sample(pool0, total - 1 - n1)])
        qrng.shuffle(cands)
        groups.append(cands)
        qid = f"q{i:04d}"
        for e, label in cands:
            rows.append((qid, q.summary, e.doc_id, e.body, label))

    for row in rows:
        for field in row[:4]:
            assert field and not re.search(r"[\t\r\n]", field) and field[0] != '"', row
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = "qid\tquery\tdoc_id\tdoc\tlabel\n" + "".join(
        f"{qid}\t{query}\t{doc_id}\t{doc}\t{label}\n" for qid, query, doc_id, doc, label in rows)
    payload = data.encode("utf-8")
    with open(args.out, "wb") as f:
        f.write(payload)

    # Report.
    docs = {r[2]: r[3] for r in rows}
    hist = collections.Counter(r[4] for r in rows)
    print(f"python          {sys.version.split()[0]}")
    print(f"source entries  {len(entries)} documents from {len(by_module)} modules; "
          f"{len(eligible)} usable queries")
    print(f"queries         {len(chosen)} (from {len(per_module)} modules)")
    print(f"pairs           {len(rows)}")
    print(f"distinct docs   {len(docs)}")
    print("labels          " + ", ".join(f"{l}: {hist[l]}" for l in sorted(hist)))
    print(f"candidates/q    min {min(map(len, groups))}, "
          f"mean {len(rows) / len(groups):.1f}, max {max(map(len, groups))}")
    print(f"words/doc       {sum(len(d.split()) for d in docs.values()) / len(docs):.1f} "
          f"(distinct docs), words/query "
          f"{sum(len(q.summary.split()) for q in chosen) / len(chosen):.1f}")
    print(f"size            {len(payload)} bytes")
    print(f"sha256          {hashlib.sha256(payload).hexdigest()}")

    # Difficulty check: BM25 (idf over the distinct docs) vs random, NDCG@10 with gain 2^l - 1.
    doc_tokens = {d: tokens(t) for d, t in docs.items()}
    df = collections.Counter(w for toks in doc_tokens.values() for w in set(toks))
    n_docs = len(doc_tokens)
    avgdl = sum(map(len, doc_tokens.values())) / n_docs
    k1, b = 1.2, 0.75

    def bm25(query: list[str], doc_id: str) -> float:
        toks = doc_tokens[doc_id]
        tf = collections.Counter(toks)
        score = 0.0
        for w in set(query):
            if tf[w]:
                idf = math.log(1 + (n_docs - df[w] + 0.5) / (df[w] + 0.5))
                score += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(toks) / avgdl))
        return score

    def jaccard(query: list[str], doc_id: str) -> float:
        a, d = set(query), set(doc_tokens[doc_id])
        return len(a & d) / len(a | d) if a | d else 0.0

    eval_rng = random.Random(f"{args.seed}:random-ranker")
    results = {"bm25": [], "jaccard": [], "random": []}
    for q, cands in zip(chosen, groups):
        labels = [l for _, l in cands]
        qt = tokens(q.summary)
        for name, fn in (("bm25", bm25), ("jaccard", jaccard)):
            # stable sort: ties keep the (shuffled) candidate order
            ranked = sorted(range(len(cands)), key=lambda j: -fn(qt, cands[j][0].doc_id))
            results[name].append(ndcg_at_10([labels[j] for j in ranked], labels))
        rand = []
        for _ in range(100):
            perm = labels[:]
            eval_rng.shuffle(perm)
            rand.append(ndcg_at_10(perm, labels))
        results["random"].append(sum(rand) / len(rand))
    for name in ("random", "jaccard", "bm25"):
        vals = results[name]
        print(f"NDCG@10 {name:8s}{sum(vals) / len(vals):.4f}")


if __name__ == "__main__":
    main()
