"""Markdown tables of one ``proofs.py`` call, for experiments/results/learning_proof.md.

    python experiments/learning_proof/summarize.py <proofs.py --out dir> [--device "one NVIDIA H200"] [--commit abc1234]

Reads ``proofs.json`` and every run's ``learning_proof.json`` and ``eval*/predictions.jsonl``;
prints one section per claim that ran (1: the three seeds, >= 93% each; 3: short vs long answers per
loss averaging; 4: clean vs JPEG-degraded accuracy with and without the augmentation). A run that
failed is listed with its exit code and the tail of its log.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

KINDS = [("image_questions", "image questions"), ("one_image/count", "count"),
         ("one_image/colour_at", "colour at an edge"), ("one_image/count_colour", "count by colour"),
         ("one_image/count_shape", "count by shape"), ("one_image/shape_at", "shape at an edge"),
         ("one_image/exists", "presence (colour + shape)"), ("one_image/describe", "describe (long answer)"),
         ("two_images", "two images (all kinds)"), ("text", "text")]
LONG = "one_image/describe"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def load(out: Path, name: str) -> dict | None:
    p = out / name / "learning_proof.json"
    return json.loads(p.read_text()) if p.is_file() else None


def predictions(out: Path, name: str, folder: str = "eval") -> list[dict]:
    p = out / name / folder / "predictions.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def length_scores(rows: list[dict]) -> dict:
    """Exact match of short image answers (every one-word kind) and of long ones (describe), and the
    long answers' item accuracy: list items right in their place, over the longer of the two lists."""
    short, long, item = [], [], []
    for r in rows:
        kind = r["group"].split("/")[0]
        if kind not in ("one_image", "two_images"):
            continue
        if r["group"] == LONG:
            long.append(r["exact_match"])
            ref, pred = items(r["reference"]), items(r["prediction"])
            item.append(sum(a == b for a, b in zip(ref, pred)) / max(len(ref), len(pred), 1))
        else:
            short.append(r["exact_match"])
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"short": mean(short), "n_short": len(short), "long": mean(long), "n_long": len(long), "long_items": mean(item)}


def stage2(r: dict) -> tuple[str, str]:
    s = "instruction_tuning"
    rate = r.get("steps_per_s", {}).get(s)
    return f"{r['steps_done'].get(s)} / {r['steps'].get(s)}", "-" if rate is None else f"{rate:.1f}"


def failed(out: Path, proofs: dict, names) -> list[str]:
    lines = []
    for n in names:
        info = proofs["runs"].get(n)
        if info is not None and (info["rc"] != 0 or load(out, n) is None):
            log = out / n / "run.log"
            tail = log.read_text().splitlines()[-3:] if log.is_file() else []
            lines.append(f"- **{n} failed** (exit {info['rc']}): `{' | '.join(tail)[-300:]}`")
    return lines


def claim1(out: Path, proofs: dict) -> list[str]:
    names = [n for n in ("seed1", "seed2", "seed3") if n in proofs["runs"]]
    runs = {n: load(out, n) for n in names}
    ok = {n: r for n, r in runs.items() if r}
    md = ["### Claim 1: robust margin (>= 93% exact match on held-out image questions in each of three runs)", ""]
    md += failed(out, proofs, names)
    if not ok:
        return md + ["", "No run finished."]
    md += ["| run | stage 2 steps done / cap | stage 2 steps/s | total s | image questions | chance |",
           "|---|---|---|---|---|---|"]
    for n, r in ok.items():
        done, rate = stage2(r)
        a = r["accuracy"]["image_questions"]
        md.append(f"| {n} | {done} | {rate} | {r['seconds']['total']:.0f} | **{pct(a['exact_match'])}** | {pct(a['chance'])} |")
    scores = [r["accuracy"]["image_questions"]["exact_match"] for r in ok.values()]
    verdict = "met" if len(scores) == 3 and min(scores) >= 0.93 else "not met"
    md += ["", f"Lowest {pct(min(scores))}%, mean {pct(sum(scores) / len(scores))}% over {len(scores)} runs: "
               f"the >= 93% target is **{verdict}**.", ""]
    md += ["| kind | " + " | ".join(ok) + " | chance |", "|---|" + "---|" * (len(ok) + 1)]
    first = next(iter(ok.values()))["accuracy"]
    for key, label in KINDS:
        if key in first:
            md.append(f"| {label} | " + " | ".join(pct(r["accuracy"].get(key, {}).get("exact_match")) for r in ok.values())
                      + f" | {pct(first[key]['chance'])} |")
    return md


def claim3(out: Path, proofs: dict) -> list[str]:
    names = [n for n in ("square", "token", "sample") if n in proofs["runs"]]
    md = ["### Claim 3: square vs token vs sample averaging, short and long answers, the same steps", ""]
    md += failed(out, proofs, names)
    md += ["| loss | stage 2 steps done / planned | short image answers (n) | long answers: exact (n) | "
           "long answers: items in place | image questions | text |", "|---|---|---|---|---|---|---|"]
    for n in names:
        r = load(out, n)
        if r is None:
            continue
        s = length_scores(predictions(out, n))
        done, _ = stage2(r)
        md.append(f"| {n} | {done} | {pct(s['short'])} ({s['n_short']}) | {pct(s['long'])} ({s['n_long']}) | "
                  f"{pct(s['long_items'])} | {pct(r['accuracy']['image_questions']['exact_match'])} | "
                  f"{pct(r['accuracy'].get('text', {}).get('exact_match'))} |")
    return md


def claim4(out: Path, proofs: dict) -> list[str]:
    names = [n for n in ("square", "nojpeg") if n in proofs["runs"]]
    md = ["### Claim 4: random JPEG, held-out images re-encoded at quality 30-60", ""]
    md += failed(out, proofs, names)
    md += ["| run | random JPEG in training | stage 2 steps | clean: image questions | degraded | drop (points) |",
           "|---|---|---|---|---|---|"]
    drops = {}
    for n in names:
        r = load(out, n)
        if r is None or not r.get("degraded"):
            continue
        clean = r["accuracy"]["image_questions"]["exact_match"]
        bad = r["degraded"]["accuracy"]["image_questions"]["exact_match"]
        drops[n] = clean - bad
        done, _ = stage2(r)
        md.append(f"| {n} | {'off' if n == 'nojpeg' else 'on'} | {done} | {pct(clean)} | {pct(bad)} | {100 * (clean - bad):.1f} |")
    if len(drops) == 2:
        held = drops["square"] < drops["nojpeg"]
        md += ["", f"The augmented model loses {100 * drops['square']:.1f} points, the other {100 * drops['nojpeg']:.1f}: "
                   f"the claim **{'holds' if held else 'does not hold'}** in this run."]
    return md


def claim2(out: Path, proofs: dict) -> list[str]:
    names = [n for n in ("small_llm", "large_scratch", "large_progressive") if n in proofs["runs"]]
    md = ["### Claim 2: progressive scaling (the small model's ViT onto a larger LLM: MLP warmup + stage 2, "
          "half the steps, reaches the larger model's from-scratch accuracy)", ""]
    md += failed(out, proofs, names)
    md += ["| run | LLM | stages | stage 2 steps done / planned | image questions | text |", "|---|---|---|---|---|---|"]
    acc = {}
    for n in names:
        r = load(out, n)
        if r is None:
            continue
        llm = "768 x 12" if n.startswith("large") else "512 x 8"
        done, _ = stage2(r)
        acc[n] = (r["accuracy"]["image_questions"]["exact_match"], r["steps_done"].get("instruction_tuning"))
        md.append(f"| {n} | {llm} | {' + '.join(r.get('stages', []))} | {done} | "
                  f"**{pct(acc[n][0])}** | {pct(r['accuracy'].get('text', {}).get('exact_match'))} |")
    if "large_scratch" in acc and "large_progressive" in acc:
        (a_s, n_s), (a_p, n_p) = acc["large_scratch"], acc["large_progressive"]
        held = a_p >= a_s and n_p is not None and n_s is not None and 2 * n_p <= n_s
        md += ["", f"Progressive {pct(a_p)}% in {n_p} stage-2 steps against from scratch {pct(a_s)}% in {n_s}: "
                   f"the claim **{'holds' if held else 'does not hold'}** in this run (the small model's own steps "
                   f"are not counted, as in the recipe)."]
    return md


def claim6(out: Path, proofs: dict) -> list[str]:
    md = ["### Claim 6: preference stage (MPO after the SFT checkpoint, >= 2 points exact match on held-out questions)", ""]
    md += failed_script(out, proofs, "mpo")
    p = out / "mpo" / "mpo_after_sft.json"
    if not p.is_file():
        return md + ["No result (`mpo/mpo_after_sft.json` missing; see `mpo/run.log`)."]
    r = json.loads(p.read_text())
    em = r["exact_match"]
    md += ["| checkpoint | held-out exact match (all questions) |", "|---|---|",
           f"| SFT (small_llm) | {pct(em.get('sft'))} |", f"| MPO | {pct(em.get('mpo'))} |", "",
           f"Gain {r['gain_points']:+.2f} points: the claim **{'holds' if r['claim_gain_ge_2_points'] else 'does not hold'}** "
           f"in this run; {r.get('wall_seconds', '?')} s. Reward accuracy on held-out pairs: not computed by "
           f"`experiments/preference/gpu_mpo_after_sft.py` (its CPU proof reports it)."]
    return md


def failed_script(out: Path, proofs: dict, name: str) -> list[str]:
    info = proofs["runs"].get(name)
    if info is None or info["rc"] == 0:
        return []
    log = out / name / "run.log"
    tail = log.read_text().splitlines()[-3:] if log.is_file() else []
    return [f"- **{name} failed** (exit {info['rc']}): `{' | '.join(tail)[-300:]}`", ""]


def per_kind_degraded(out: Path) -> list[str]:
    rows = defaultdict(dict)
    for n in ("square", "nojpeg"):
        r = load(out, n)
        if r and r.get("degraded"):
            for key, label in KINDS:
                if key in r["accuracy"]:
                    rows[label][n] = (r["accuracy"][key]["exact_match"], r["degraded"]["accuracy"][key]["exact_match"])
    if not rows:
        return []
    md = ["", "| kind | square: clean / degraded | nojpeg: clean / degraded |", "|---|---|---|"]
    for label, v in rows.items():
        md.append(f"| {label} | " + " | ".join(f"{pct(v[n][0])} / {pct(v[n][1])}" if n in v else "-" for n in ("square", "nojpeg")) + " |")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--device", default="one NVIDIA H200 (device tool), 16 host cores")
    ap.add_argument("--commit", default="(fill in)")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "proofs.json").is_file():
        proofs = json.loads((out / "proofs.json").read_text())
    else:  # proofs.py did not finish (killed at the call's limit): what the runs left
        names = sorted(p.parent.name for p in out.glob("*/run.log"))
        proofs = {"runs": {n: {"rc": 0 if load(out, n) else "?"} for n in names}, "claims": [1, 3, 4],
                  "date_utc": "?", "total_seconds": float("nan"), "data_seconds": float("nan")}
        print("(no proofs.json: the call was cut before proofs.py finished)\n")
    first = next((load(out, n) for n in proofs["runs"] if load(out, n)), None) or {}
    md = [f"Device: {args.device}; torch {first.get('torch', '?')}; commit {args.commit}; {proofs['date_utc']} UTC; "
          f"the whole call {proofs['total_seconds']:.0f} s (data {proofs['data_seconds']:.0f} s), "
          f"{len(proofs['runs'])} runs at once on one GPU.", ""]
    claims = proofs["claims"]
    if 1 in claims:
        md += claim1(out, proofs) + [""]
    if 2 in claims:
        md += claim2(out, proofs) + [""]
    if 6 in claims:
        md += claim6(out, proofs) + [""]
    if 3 in claims:
        md += claim3(out, proofs) + [""]
    if 4 in claims:
        md += claim4(out, proofs) + per_kind_degraded(out) + [""]
    print("\n".join(md))


if __name__ == "__main__":
    main()
