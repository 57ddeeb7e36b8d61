"""report.html: one self-contained page per run, built from the run's published files (no paddle).

Inputs are what a finished run leaves in OUT: report.json (whose bounded summaries the run's
finish step computed from every row: score histogram, per-query NDCG@10 with the worst queries and
their texts, output lengths, finish reasons, the generation sample with prompts and ROUGE-L) and
rejects.tsv; `--compare` also reads both runs' queries.tsv or generations.jsonl. So
`python -m pipeline report OUT` rebuilds the page of any finished (or resumed) run without
reading every row, and `--compare OTHER_OUT` puts two runs side by side.

Self-contained: inline CSS and inline SVG charts (matplotlib, Agg backend), no script or font
from the network. Size is bounded whatever the run's size: charts summarise every row, tables
hold at most `MAX_TABLE_ROWS` rows (the worst first), texts are cut at `MAX_TEXT` characters,
so the page stays under `SIZE_LIMIT_BYTES` (2 MB) for a million-row run.

Every number taken from report.json sits in an element with `data-key="<dotted path>"` and
`data-value="<the JSON value>"`, so tests compare the page with report.json exactly.
"""

from __future__ import annotations

import html
import io
import json
from collections import Counter
from pathlib import Path

SIZE_LIMIT_BYTES = 2_000_000
MAX_TABLE_ROWS = 50
MAX_TEXT = 400

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.chart svg{max-width:100%;height:auto}.bad{color:#b00}details{margin:.3em 0}.cols{display:flex;gap:2em}
pre.prompt{white-space:pre-wrap;background:#f8f8f8;padding:4px}
.worst-query td:nth-child(5){width:50%}.worst-query td:nth-child(2){overflow-wrap:anywhere;min-width:14em}"""

# Marks the page as rendered and records script errors in the DOM (the browser test reads both).
_SCRIPT = """<script>window.onerror=function(m){var e=document.getElementById('script-errors');
e.textContent+=m+'\\n';};document.addEventListener('DOMContentLoaded',function(){
document.body.setAttribute('data-rendered',document.querySelectorAll('.chart svg').length);});</script>"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + " ..."


def _num(key: str, value) -> str:
    """A number from report.json, tagged with its path and exact value."""
    shown = "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    return (f'<span data-key="{_esc(key)}" data-value="{_esc(json.dumps(value))}">{_esc(shown)}</span>')


def _table(head: list[str], rows: list[list[str]]) -> str:
    """`rows` are HTML already (escape text with _esc)."""
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return '<div class="chart">' + text[text.index("<svg"):] + "</div>"


def _figure(width: float = 6.0, height: float = 2.6):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text as text: smaller, and no embedded font
    return plt.subplots(figsize=(width, height))


def _bar_chart(labels: list[str], values: list[float], xlabel: str) -> str:
    fig, ax = _figure(6, 0.3 * len(labels) + 0.8)
    ax.barh(labels[::-1], values[::-1], color="#4878a8")
    ax.set_xlabel(xlabel)
    return _svg(fig)


def _stairs(counts: list[int], edges: list[float], xlabel: str, ylabel: str = "count") -> str:
    """A histogram already counted (report.json's bins and counts)."""
    fig, ax = _figure()
    ax.stairs(counts, edges, fill=True, color="#4878a8")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _svg(fig)


def _histogram(values, xlabel: str, bins: int = 30) -> str:
    fig, ax = _figure()
    ax.hist(values, bins=bins, color="#4878a8")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _svg(fig)


def _line_chart(xs, ys, xlabel: str, ylabel: str) -> str:
    fig, ax = _figure()
    ax.plot(xs, ys, color="#4878a8", marker="." if len(xs) < 50 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _svg(fig)


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        return [], []
    with open(path, encoding="utf-8") as f:
        head = f.readline().rstrip("\n").split("\t")
        return head, [line.rstrip("\n").split("\t") for line in f]


# --------------------------------------------------------------------------- sections


def _accounting(report: dict, done_key: str) -> str:
    rows = [[_esc(f["file"]), _num(f"files.{i}.rows_read", f["rows_read"]),
             _num(f"files.{i}.{done_key}", f[done_key]), _num(f"files.{i}.rows_rejected", f["rows_rejected"])]
            for i, f in enumerate(report["files"])]
    r = report["rows"]
    done = "generated" if done_key == "rows_generated" else "scored"
    rows.append(["<b>all</b>", _num("rows.read", r["read"]), _num(f"rows.{done}", r[done]),
                 _num("rows.rejected", r["rejected"])])
    return "<h2>Rows</h2>" + _table(["file", "read", done, "rejected"], rows)


def _rejects(out_dir: Path) -> str:
    head, rows = _read_tsv(out_dir / "rejects.tsv")
    if not rows:
        return "<h2>Rejects</h2><p>none</p>"
    reason_at = head.index("reason")
    by_reason = Counter(r[reason_at] for r in rows)
    example = {}
    for r in rows:
        example.setdefault(r[reason_at], r)
    table = [[_esc(_cut(reason)), f'<span class="num">{n}</span>',
              _esc(f"{example[reason][0]}:{example[reason][1]} ({example[reason][3] if len(head) > 4 else example[reason][2]})")]
             for reason, n in by_reason.most_common(10)]
    return ("<h2>Rejects</h2>" + f"<p>{len(rows)} rejected rows, {len(by_reason)} reasons; the top ten with an example "
            "(file:line, id). All of them: rejects.tsv.</p>" + _table(["reason", "rows", "example"], table))


def _timing(report: dict) -> str:
    secs = {k: v for k, v in report["seconds"].items() if k != "total"}
    chart = _bar_chart(list(secs), list(secs.values()), "seconds")
    total = _num("seconds.total", report["seconds"]["total"])
    cells = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{_num('seconds.' + k, v)}</td></tr>" for k, v in secs.items())
    return (f"<h2>Time per stage</h2><p>total {total} s (stages overlap: reading and tokenizing run beside the "
            f"model)</p><div class=cols>{chart}<table>{cells}</table></div>")


def _throughput(report: dict, unit: str) -> str:
    """Rows/s (and tokens/s) per committed window against the elapsed processing time."""
    w = (report.get("throughput") or {}).get("windows") or []
    if not w:
        return ""
    ends = [x[0] for x in w]
    secs = [max(b - a, 1e-9) for a, b in zip([0.0] + ends[:-1], ends)]
    if len(w) == 1:  # a chart of one point says nothing: a run shorter than one window (--window-rows)
        return (f'<h2>Throughput over the run</h2><p data-windows="1">one committed window ({w[0][1]} rows, '
                f"{w[0][2] / secs[0]:.4g} {_esc(unit)} tokens/s over {ends[0]:.3g} s of processing): the run is "
                "shorter than one window (--window-rows), so there is no curve to draw</p>")
    fig, ax = _figure()
    ax.plot(ends, [x[2] / s for x, s in zip(w, secs)], color="#4878a8", marker="." if len(w) < 50 else None)
    ax.set_xlabel("elapsed processing seconds (end of window)")
    ax.set_ylabel(f"{unit} tokens/s")
    sessions = sorted({x[3] for x in w})
    for x, prev in zip(w[1:], w[:-1]):
        if x[3] != prev[3]:
            ax.axvline(prev[0], color="#b00", linestyle=":")
    note = (f"; a resumed run: {len(sessions)} sessions, each session's windows shown after the previous "
            "one's (dotted lines), the time between sessions left out" if len(sessions) > 1 else "")
    return (f'<h2>Throughput over the run</h2><p data-windows="{len(w)}">{len(w)} points (committed windows, '
            f"neighbours merged to at most 200){note}</p>" + _svg(fig))


def _queries(report: dict) -> str:
    q = report.get("queries")
    if not q:
        return ""
    chart = _stairs(q["ndcg_at_10_counts"], q["ndcg_at_10_bins"], "NDCG@10 per query", "queries")
    parts = []
    for i, w in enumerate(q["worst"]):
        docs = _table(["rank", "doc_id", "score", "label", "document", "file:line"],
                      [[str(d["rank"]), _esc(d["doc_id"]), f"{d['score']:.4g}",
                        _num(f"queries.worst.{i}.top.{j}.label", d["label"]), _text(d, "text"), _where(d)]
                       for j, d in enumerate(w["top"])])
        query = f' <span class="query-text">{_esc(_cut(w["query"]))}</span>' if w.get("query") else ""
        parts.append(f'<details class="worst-query" data-qid="{_esc(w["qid"])}"><summary>{_esc(w["qid"])}: NDCG@10 '
                     f'{_num(f"queries.worst.{i}.ndcg_at_10", w["ndcg_at_10"])}{query}</summary>{docs}</details>')
    return (f"<h2>Per-query NDCG@10</h2><p>{sum(q['ndcg_at_10_counts'])} queries (every value: {_esc(q['file'])})"
            f"</p>{chart}<h3>Worst {len(q['worst'])} queries</h3><p>lowest NDCG@10 first, with the query text; click "
            "one for its top documents, their labels and texts (read again from the inputs)</p>" + "".join(parts))


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    return '<span class="bad">n/a</span>' if value is None else _esc(_cut(value))


def _where(record: dict) -> str:
    return _esc(f"{record['file']}:{record['line']}") if record.get("file") is not None else ""


def _settings_and_model(report: dict) -> str:
    model = _table(["field", "value"], [[_esc(k), _esc(v)] for k, v in report["model"].items()])
    settings = _table(["setting", "value"], [[_esc(k), _esc(v)] for k, v in report["settings"].items()])
    precision = report.get("precision", {})
    return (f"<h2>Model and settings</h2><p>precision {_esc(precision.get('used', ''))}: "
            f"{_esc(precision.get('reason', ''))}</p><div class=cols>{model}{settings}</div>")


def _metrics(report: dict) -> str:
    m = report.get("metrics")
    if not m:
        return "<h2>Metrics</h2><p>none (no labels or references)</p>"
    rows = [[_esc(k), _num(f"metrics.{k}", v)] for k, v in m.items() if isinstance(v, (int, float)) or v is None]
    return "<h2>Metrics</h2>" + _table(["metric", "value"], rows)


def _scoring_sections(report: dict, out_dir: Path) -> list[str]:
    t = report["tokens"]
    out = [_accounting(report, "rows_scored"), _rejects(out_dir), _timing(report),
           f"<h2>Throughput and padding</h2><p>{_num('rows_per_second', report['rows_per_second'])} rows/s, "
           f"{_num('tokens_per_second', report['tokens_per_second'])} tokens/s; {_num('tokens.real', t['real'])} real "
           f"tokens, {_num('tokens.padded', t['padded'])} padded (padding overhead "
           f"{_num('tokens.padding_overhead', t['padding_overhead'])}) in {_num('tokens.batches', t['batches'])} "
           f"batches</p>", _throughput(report, "model input")]
    sc = report.get("scores")
    if sc and sc["counts"]:
        bad = f"; {_num('scores.nonfinite', sc['nonfinite'])} NaN or infinite, not shown" if sc["nonfinite"] else ""
        out.append(f"<h2>Score distribution</h2><p>{_num('scores.pairs', sc['pairs'])} scored pairs{bad}</p>"
                   + _stairs(sc["counts"], sc["bins"], "score", "pairs"))
    elif sc is None:
        out.append("<h2>Score distribution</h2><p>not in report.json (a run of an older version)</p>")
    out.append(_metrics(report))
    out.append(_queries(report))
    return out


def _generation_sections(report: dict, out_dir: Path) -> list[str]:
    t = report["tokens"]
    out = [_accounting(report, "rows_generated"), _rejects(out_dir), _timing(report),
           f"<h2>Speed and padding</h2><p>{_num('generated_tokens_per_second', report['generated_tokens_per_second'])}"
           f" generated tokens/s, {_num('rows_per_second', report['rows_per_second'])} rows/s; "
           f"{_num('tokens.generated', t['generated'])} generated tokens in {_num('tokens.candidates', t['candidates'])}"
           f" candidates; prompt padding overhead {_num('tokens.padding_overhead', t['padding_overhead'])}</p>",
           _throughput(report, "generated")]
    o = report.get("outputs") or {}
    if o.get("best_candidate_tokens"):
        lengths = dict(o["best_candidate_tokens"])  # [[tokens, rows], ...], ascending
        reasons = o["finish_reasons"]
        span = range(min(lengths), max(lengths) + 1)  # every length between (at most max_new_tokens)
        counts, edges = [lengths.get(n, 0) for n in span], [n - 0.5 for n in span] + [span[-1] + 0.5]
        cells = "".join(f"<tr><td>{_esc(k)}</td><td class=num>{_num('outputs.finish_reasons.' + k, v)}</td></tr>"
                        for k, v in reasons.items())
        out.append("<h2>Output length and finish reasons</h2><div class=cols>"
                   + _stairs(counts, edges, "tokens of the best candidate", "rows")
                   + _bar_chart(list(reasons), list(reasons.values()), "candidates") + f"<table>{cells}</table></div>")
    out.append(_metrics(report))
    if report.get("sample"):
        out.append(_generation_sample(report["sample"]))
    return out


def _read_generations(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _generation_sample(sample: dict) -> str:
    """report.json's sample: worst ROUGE-L of the best candidate first, with the prompt."""
    parts = []
    for i, r in enumerate(sample["rows"]):
        cands = _table(["#", "score", "tokens", "finish", "text"],
                       [[str(k + 1), f"{c['score']:.3f}", str(c["num_tokens"]), _esc(c["finish_reason"]),
                         _esc(_cut(c["text"]))] for k, c in enumerate(r["candidates"])])
        refs = "".join(f"<li>{_esc(_cut(x))}</li>" for x in r["references"]) or "<li>none</li>"
        best = r["candidates"][0]["text"] if r["candidates"] else ""
        parts.append(f'<details class="sample" data-id="{_esc(r["id"])}"><summary>{_esc(r["id"])}: ROUGE-L '
                     f'{_num(f"sample.rows.{i}.rouge_l", r["rouge_l"])} - {_esc(_cut(best)[:120])}</summary>'
                     f'<p>prompt ({_where(r)})</p><pre class="prompt">{_text(r, "prompt")}</pre>'
                     f"{cands}<p>references</p><ul>{refs}</ul></details>")
    return (f"<h2>Sample of rows</h2><p>{len(sample['rows'])} of {_num('sample.of', sample['of'])} rows, "
            f"{_esc(sample['order'])} (click a row for its prompt, ranked candidates and references)</p>" + "".join(parts))


# --------------------------------------------------------------------------- compare


def _flat_metrics(report: dict) -> dict[str, float]:
    return {k: v for k, v in (report.get("metrics") or {}).items() if isinstance(v, (int, float))}


def _compare_section(report: dict, other: dict, out_dir: Path, other_dir: Path) -> str:
    a, b = _flat_metrics(report), _flat_metrics(other)
    rows = [[_esc(k), f"{a[k]:.4g}", f"{b[k]:.4g}",
             f'<span data-key="delta.{_esc(k)}" data-value="{a[k] - b[k]!r}">{a[k] - b[k]:+.4g}</span>']
            for k in a if k in b]
    speed = "rows_per_second"
    rows.append([speed, f"{report[speed]:.4g}", f"{other[speed]:.4g}", f"{report[speed] - other[speed]:+.4g}"])
    return (f"<h2>Compared with {_esc(other_dir)}</h2>"
            + _table(["metric", "this run", "other run", "difference"], rows)
            + (_compare_generations(out_dir, other_dir) if report.get("task") == "generate"
               else _compare_queries(out_dir, other_dir)))


def _read_queries(path: Path) -> dict[str, float]:
    head, rows = _read_tsv(path)
    return {r[0]: float(r[1]) for r in rows} if head else {}


def _compare_queries(out_dir: Path, other_dir: Path) -> str:
    """Per-query NDCG@10 differences over the queries both runs evaluated (queries.tsv)."""
    a, b = _read_queries(out_dir / "queries.tsv"), _read_queries(other_dir / "queries.tsv")
    both = [q for q in a if q in b]
    if not both:
        return "<p>no per-query NDCG@10 in both runs (queries.tsv)</p>"
    diff = {q: a[q] - b[q] for q in both}
    changed = sorted((q for q in both if diff[q] != 0.0), key=lambda q: (-abs(diff[q]), q))
    rows = [[_esc(q), f"{a[q]:.4g}", f"{b[q]:.4g}", f'<span class="query-delta" data-qid="{_esc(q)}" '
             f'data-value="{diff[q]!r}">{diff[q]:+.4g}</span>'] for q in changed[:MAX_TABLE_ROWS]]
    return (f'<h3>Per-query NDCG@10</h3><p data-changed-queries="{len(changed)}">{len(both)} queries in both runs, '
            f"{len(changed)} changed; the largest changes first</p>" + _histogram(list(diff.values()),
            "NDCG@10 this run - other run", bins=20) + _table(["qid", "this run", "other run", "difference"], rows))


def _compare_generations(out_dir: Path, other_dir: Path) -> str:
    """Rows whose best candidate text differs between the two runs (same ids)."""
    a = {r["id"]: r for r in _read_generations(out_dir / "generations.jsonl")}
    b = {r["id"]: r for r in _read_generations(other_dir / "generations.jsonl")}
    best = lambda r: r["candidates"][0]["text"] if r["candidates"] else ""  # noqa: E731
    both = [i for i in a if i in b]
    changed = [i for i in both if best(a[i]) != best(b[i])]
    rows = [[_esc(i), _esc(_cut(best(a[i]))), _esc(_cut(best(b[i])))] for i in changed[:MAX_TABLE_ROWS]]
    return (f'<h3>Best candidate changed</h3><p data-changed-rows="{len(changed)}">{len(changed)} of {len(both)} '
            f"rows in both runs; the first {len(rows)}</p>"
            + _table(["id", "this run's best", "other run's best"], rows).replace("<tr><td>", '<tr class="changed-row"><td>'))


# --------------------------------------------------------------------------- page


def build_page(out_dir: Path, compare_dir: Path | None = None) -> str:
    out_dir = Path(out_dir)
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    task = report.get("task", "scoring")
    title = f"{task} run: {report['model']['name']}, {report['started_at']}"
    sections = (_generation_sections if task == "generate" else _scoring_sections)(report, out_dir)
    if compare_dir is not None:
        other = json.loads((Path(compare_dir) / "report.json").read_text(encoding="utf-8"))
        sections.insert(0, _compare_section(report, other, out_dir, Path(compare_dir)))
    sections.append(_settings_and_model(report))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style>"
            f"{_SCRIPT}</head><body data-task='{_esc(task)}'><h1>{_esc(title)}</h1>"
            f"<pre id='script-errors' class='bad'></pre>" + "".join(sections) + "</body></html>")


def write_page(out_dir: Path, compare_dir: Path | None = None) -> Path:
    """Write OUT/report.html (atomically) and return its path."""
    text = build_page(out_dir, compare_dir)
    path = Path(out_dir) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
