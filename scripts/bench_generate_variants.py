"""Generation settings side by side: the same prompts through `python -m pipeline generate` with
one setting changed at a time, alternating rounds, one table and a JSON.

    python scripts/bench_generate_variants.py [--prompts 64] [--max-new-tokens 48] [--rounds 2]
        [--threads 2] [--json bench_out/generate_variants.json]

Variants (each a full CLI run, fresh --out, report.json read back):
- default: continuous batching (a finished sequence's slot takes the next waiting prompt), one
  stream, --max-batch-size 32;
- static: `--batching static`: each batch runs to its longest row, finished rows dropped lazily;
- admit-4: continuous, newcomers prefilled once 4 slots are free (`--admit-min 4`; default 1);
- keep-finished: finished rows stay in the batch, fed padding (`--keep-finished`): what dropping saves;
- streams-2: two decoder predictors with one thread each;
- batch-64 / batch-16 / batch-8: other row caps (bigger batches read the weights once for more
  rows per step; smaller ones finish sooner and pad less).
Rounds alternate the variants so the VM's drift hits all alike; the table gives the median of
generated tokens/s excluding start-up (report seconds), the decode step and prefill seconds, and
checks that every variant generated the same tokens as the default for every row (none of these
settings may change a result; log-probabilities may differ in the last float32 digits, since
other batch shapes run other kernel blockings: the largest difference is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {
    "default": [],
    "static": ["--batching", "static"],
    "admit-4": ["--admit-min", "4"],
    "keep-finished": ["--keep-finished"],
    "streams-2": ["--streams", "2"],
    "batch-64": ["--max-batch-size", "64"],
    "batch-16": ["--max-batch-size", "16"],
    "batch-8": ["--max-batch-size", "8"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--stop", action="append", default=[], help="passed to generate (mixes the output lengths)")
    ap.add_argument("--first", type=int, default=0, help="skip the sample's first N prompts")
    ap.add_argument("--json", type=Path, default=REPO / "bench_out" / "generate_variants.json")
    args = ap.parse_args()

    from pipeline.engine.paddle_env import cpu_info

    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-variants-"))
    src = tmp / "prompts.jsonl"
    lines = (REPO / "data" / "generate" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    lines = lines[args.first:args.first + args.prompts]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    outputs: dict[str, dict] = {}
    for r in range(args.rounds):
        for v in args.variants:
            out = tmp / f"{v}-{r}"
            cmd = [sys.executable, "-m", "pipeline", "generate", str(src), "--out", str(out), "--no-progress",
                   "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens), *VARIANTS[v],
                   *[f"--stop={x}" for x in args.stop]]
            load = os.getloadavg()[0]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
            rep = json.loads((out / "report.json").read_text())
            s, t = rep["seconds"], rep["tokens"]
            work = s["total"] - s["startup"]
            runs[v].append({"tokens_per_s": t["generated"] / work, "seconds": work, "prefill": s["prefill"],
                            "decode_steps": s["decode_steps"], "row_steps": t["row_steps"],
                            "steps": t["decode_steps"], "batches": t["batches"], "padding": t["padding_overhead"],
                            "idle_row_steps": t.get("idle_row_steps", 0),
                            "idle_row_steps_waiting": t.get("idle_row_steps_waiting", 0),
                            "inserts": t.get("inserts", 0), "compactions": t.get("compactions", 0),
                            "compact_s": s.get("compact", 0.0), "generated": t["generated"],
                            "load_before": load})
            if v not in outputs:
                rows = map(json.loads, (out / "generations.jsonl").read_text(encoding="utf-8").splitlines())
                outputs[v] = {g["id"]: [(c["token_ids"], c["sum_logprob"]) for c in g["candidates"]] for g in rows}
            print(f"round {r} {v:14s} {runs[v][-1]['tokens_per_s']:6.1f} tok/s  load {load:.2f}", file=sys.stderr)
    base = outputs[args.variants[0]]
    same = {v: all([t for t, _ in outputs[v][k]] == [t for t, _ in base[k]] for k in base) for v in args.variants}
    logprob_diff = {v: max((abs(a[1] - b[1]) for k in base for a, b in zip(outputs[v][k], base[k])), default=0.0)
                    for v in args.variants}
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in runs[v][0]} for v in args.variants}
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), threads {args.threads}, {args.prompts} prompts, "
          f"max_new_tokens {args.max_new_tokens}, {args.rounds} rounds (median)")
    print("| variant | tok/s | seconds | prefill s | steps s | compact s | decode steps | row-steps | idle | "
          "idle while waiting | inserts | compactions | batches | generated | same tokens | max d logp |")
    print("|" + "---|" * 16)
    for v in args.variants:
        m = med[v]
        print(f"| {v} | {m['tokens_per_s']:.1f} | {m['seconds']:.1f} | {m['prefill']:.1f} | {m['decode_steps']:.1f} | "
              f"{m['compact_s']:.2f} | {m['steps']:.0f} | {m['row_steps']:.0f} | {m['idle_row_steps']:.0f} | "
              f"{m['idle_row_steps_waiting']:.0f} | {m['inserts']:.0f} | {m['compactions']:.0f} | {m['batches']:.0f} | "
              f"{m['generated']:.0f} | {same[v]} | {logprob_diff[v]:.1e} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "stop": args.stop, "first": args.first,
                                     "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                                     "runs": runs, "median": med, "same_tokens": same,
                                     "max_sum_logprob_diff": logprob_diff}, indent=2) + "\n")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
