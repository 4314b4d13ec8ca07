"""Precision and recall of the heuristic rules of `python -m vlmtrain.filter` on demo data with
injected defects of every rule's kind and clean look-alikes (vlmtrain.filtering.defects); writes
experiments/results/filter.md.

    python experiments/filter/precision_recall.py       # seed 0 in full (and InternVL's `distinct` measure), seeds 1-3 overall
    python experiments/filter/precision_recall.py --seeds 5 --no-write

Each run is the product command on the generated data (`python -m vlmtrain.filter data=single
data.path=<defects>/annotations.jsonl out=<dir>`); the second one only switches the n-gram rule to
the InternVL code's arithmetic (filter.rules.ngram_repetition.measure=distinct) to show what it misses.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlmtrain.filtering.defects import evaluate, make_defect_dataset  # noqa: E402


def run_filter(data: Path, out: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "vlmtrain.filter", "data=single", f"data.path={data}", f"out={out}",
           "filter.progress=false", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"filter failed:\n{res.stderr[-3000:]}")
    return cmd


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(result: dict) -> list[str]:
    lines = ["| rule | defect lines | rejected by it | recall | precision |", "|---|---:|---:|---:|---:|"]
    for rule, r in result["per_rule"].items():
        lines.append(f"| {rule} | {r['labelled']} | {r['rejected']} | {fmt(r['recall'])} | {fmt(r['precision'])} |")
    rejected = result["defects"] - len(result["missed"]) + len(result["false_positives"])
    lines.append(f"| **all rules** | {result['defects']} | {rejected} "
                 f"| **{result['recall']:.3f}** | **{result['precision']:.3f}** |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="data seeds: the first in full, the others' overall figures")
    ap.add_argument("--work", type=Path, default=None, help="folder for the data and outputs (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write experiments/results/filter.md")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vlmtrain-filter-pr-"))
    seed = args.seeds[0]
    data = make_defect_dataset(work / "data", seed=seed)
    labels = work / "data" / "labels.json"
    cmd = run_filter(data, work / "default")
    default = evaluate(work / "default", labels, "single")
    run_filter(data, work / "distinct", "filter.rules.ngram_repetition.measure=distinct")
    distinct = evaluate(work / "distinct", labels, "single")
    others = []
    for other in args.seeds[1:]:
        d = make_defect_dataset(work / f"data-{other}", seed=other)
        run_filter(d, work / f"default-{other}")
        others.append((other, evaluate(work / f"default-{other}", d.parent / "labels.json", "single")))
    shown = " ".join(c if " " not in c else f"'{c}'" for c in ["python", "-m", *cmd[2:]])
    out = [
        "# Data filtering: precision and recall of the heuristic rules", "",
        f"Date: {datetime.date.today().isoformat()}. Device: CPU ({platform.machine()}, {os.cpu_count()} cores); "
        "no model. Produced by `python experiments/filter/precision_recall.py"
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2, 3] else "") + "`, which generates "
        f"the data (`vlmtrain.filtering.defects.make_defect_dataset(seed={seed})`) and runs", "",
        f"    {shown.replace(str(work), '<work>')}", "",
        f"Data: {default['lines']} lines, {default['defects']} with an injected defect, {default['clean']} clean "
        "(the shapes demo's image, two-image and text lines, and look-alikes a careless rule would reject: long "
        "answers, numbered and templated lists, code, markdown tables, Chinese paragraphs, rules and dot leaders, "
        "big numbers, short VQA answers, video clips, small or wide but valid images). `unreadable` is the "
        "readers' verdict (malformed JSON, missing image, empty answer, placeholder mismatch), as training "
        "would skip those lines.", "",
        "The defects and look-alikes were written with the rules in view: the figures show that each rule "
        "catches its kind of defect and leaves these look-alikes alone, not what share of a real corpus it "
        "would flag (the report of a real run, with its examples per rule, is where to judge that).", "",
        "Per rule: recall = lines labelled with the rule that it rejected / lines labelled with it; precision = "
        "lines it rejected that carry some defect / lines it rejected (one line may trip several rules: an answer "
        "over 32k characters is also too long for data.max_seq_len).", "",
        "## Default rules (`filter=default`)", "", *table(default), "",
        "Clean look-alikes kept: " + ", ".join(f"{k} {v['kept']}/{v['lines']}" for k, v in default["clean_kinds"].items())
        + ".", "",
        "Clean lines rejected: " + (", ".join(f"line {x['line']} ({x['kind']})" for x in default["false_positives"]) or "none")
        + ". Defects missed: " + (", ".join(f"line {x['line']} ({x['kind']})" for x in default["missed"]) or "none") + ".",
        "",
        *(["## Other data seeds (default rules)", "",
            "| seed | lines | defects | recall | precision | clean lines rejected | defects missed |",
            "|---:|---:|---:|---:|---:|---|---|"]
          + [f"| {sd} | {r['lines']} | {r['defects']} | {r['recall']:.3f} | {r['precision']:.3f} | "
             + (", ".join(x["kind"] for x in r["false_positives"]) or "none") + " | "
             + (", ".join(x["kind"] for x in r["missed"]) or "none") + " |" for sd, r in others] + [""] if others else []),
        "## With the InternVL code's n-gram arithmetic (`filter.rules.ngram_repetition.measure=distinct`)", "",
        "InternVL's `calculate_ngram_repetition` divides the number of *distinct* repeated 10-grams by the "
        "number of 10-gram positions, so a sentence looped k times scores about 1/k and passes the 0.4 threshold "
        "from three repeats on; the default `occurrences` measure counts the positions of repeated 10-grams.", "",
        *table(distinct), "",
        f"ngram_repetition recall: {fmt(default['per_rule']['ngram_repetition']['recall'])} (occurrences) vs "
        f"{fmt(distinct['per_rule']['ngram_repetition']['recall'])} (distinct); the loops the distinct measure "
        "passes are caught by no other rule unless they also repeat whole lines.",
    ]
    text = "\n".join(out) + "\n"
    print(text)
    if not args.no_write:
        dest = REPO / "experiments" / "results" / "filter.md"
        dest.write_text(text)
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
