"""``<out>/report.md``, ``<out>/summary.json`` and the plots under ``<out>/plots/``: what was kept
per dataset, how often each rule fired, the distribution of every rule's score (LLM scores per
dataset and per domain) and examples of each rule for review."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import cast

from vlmtrain.filtering.records import UNREADABLE, source_object

SNIPPET_CHARS = 400


def reason_key(r: dict) -> str:
    return f"{UNREADABLE}/{r['reason']}" if r["rule"] == UNREADABLE else r["rule"]


def _snippet(source, record) -> str:
    try:
        conv = source.reader.to_conversation(record.parse(), source.root)
        text = "\n".join(f"{'user' if k % 2 == 0 else 'assistant'}: {t}" for k, t in
                         enumerate(x for turn in conv.turns for x in turn))
    except Exception:  # an unreadable record: show what the file holds
        obj = source_object(record)
        text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    text = text.replace("```", "'''")
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + f" [... {len(text) - SNIPPET_CHARS} more]"


def _plots(out: Path, stats, counts, metrics, groups, rules) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    made = []

    names = [s["dataset"] for s in stats]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    ax.barh(names, [s["kept"] / s["records"] if s["records"] else 0 for s in stats], color="tab:green")
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept share")
    ax.invert_yaxis()
    ax.set_title("kept share per dataset")
    fig.tight_layout()
    fig.savefig(folder / "kept_share.png", dpi=100)
    plt.close(fig)
    made.append("plots/kept_share.png")

    total = Counter()
    for c in counts.values():
        total.update(c)
    if total:
        keys = [k for k, _ in total.most_common()]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(keys) + 1.5))
        left = [0] * len(keys)
        for name in names:
            vals = [counts[name].get(k, 0) for k in keys]
            ax.barh(keys, vals, left=left, label=name)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("samples the rule rejected")
        ax.set_title("rule counts")
        if len(names) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "rule_counts.png", dpi=100)
        plt.close(fig)
        made.append("plots/rule_counts.png")

    by_rule = {r.name: r for r in rules}
    for rule_name, per_dataset in metrics.items():
        rule = by_rule.get(rule_name)
        threshold = getattr(rule, "threshold", None)
        panels = [("per dataset", per_dataset)]
        if rule_name in groups:
            panels.append(("per domain", groups[rule_name]))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
        for ax, (title, series) in zip(axes[0], panels):
            values = [v for vs in series.values() for v in vs]
            lo, hi = min(values), max(values)
            bins = 21 if lo >= 0 and hi <= 10 and rule is not None and rule.kind == "batch" else 30
            rng = (0, 10.5) if bins == 21 else (lo, hi if hi > lo else lo + 1)
            for label, vs in sorted(series.items()):
                ax.hist(vs, bins=bins, range=rng, alpha=0.6, label=f"{label} ({len(vs)})")
            if threshold is not None:
                ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
            ax.set_title(f"{rule_name} score, {title}")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"scores_{rule_name}.png", dpi=100)
        plt.close(fig)
        made.append(f"plots/scores_{rule_name}.png")
    return made


def write_report(out: Path, cfg, mixture, verdicts, stats, slice_info, rules) -> dict:
    counts: dict[str, Counter] = {s["dataset"]: Counter() for s in stats}
    metrics: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    examples: dict[str, list] = defaultdict(list)
    n_examples = cfg.filter.examples
    for source, vs in zip(mixture.sources, verdicts):
        for v in vs:
            for k, value in v["metrics"].items():
                metrics[k][source.name].append(value)
                if k in v.get("groups", {}):
                    groups[k][v["groups"][k]].append(value)
            for r in v["reasons"]:
                key = reason_key(r)
                counts[source.name][key] += 1
                if len(examples[key]) < n_examples:
                    record = source.records[v["i"]]
                    examples[key].append((source.name, record.where(), r, _snippet(source, record)))
    llm = [s["llm"] for s in slice_info if "llm" in s]
    summary = {
        "records": sum(s["records"] for s in stats),
        "kept": sum(s["kept"] for s in stats),
        "datasets": [{**s, "rejected": s["records"] - s["kept"], "rules": dict(sorted(counts[s["dataset"]].items()))}
                     for s in stats],
        "slices": len(slice_info),
    }
    if llm:
        summary["llm"] = {"generated": sum(x["generated"] for x in llm), "cached": sum(x["cached"] for x in llm),
                          "model": llm[0]["model"], "tiny_model": llm[0]["tiny_model"],
                          "unparseable": sum(c for s in slice_info for k, c in s["counts"].items()
                                             if k.endswith("/unparseable"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    try:
        plots = _plots(out, stats, counts, metrics, groups, rules)
    except ImportError:
        plots = []
        print("report: matplotlib is not installed (pip install 'vlmtrain[plot]'): report without plots", file=sys.stderr)

    lines = ["# Data filtering report", "",
             f"`python -m vlmtrain.filter` over {len(stats)} dataset(s) in {len(slice_info)} slice(s): "
             f"kept **{summary['kept']}** of {summary['records']} records. Rejected records are in "
             "`<dataset>/rejected.jsonl` with every rule that fired and its scores; a record restored by "
             "hand is its `sample` put back into the source.", "",
             "| dataset | format | records | kept | rejected | kept share |", "|---|---|---:|---:|---:|---:|"]
    for s in summary["datasets"]:
        share = s["kept"] / s["records"] if s["records"] else 0
        lines.append(f"| {s['dataset']} | {s['format']} | {s['records']} | {s['kept']} | {s['rejected']} | {share:.1%} |")
    total = Counter()
    for c in counts.values():
        total.update(c)
    lines += ["", "## Rule counts", "", "A sample counts under every rule that fired on it.", "",
              "| rule | " + " | ".join(s["dataset"] for s in stats) + " | total |",
              "|---|" + "---:|" * (len(stats) + 1)]
    for key, c in total.most_common():
        lines.append(f"| {key} | " + " | ".join(str(counts[s['dataset']].get(key, 0)) for s in stats) + f" | {c} |")
    if not total:
        lines.append("| (none fired) |" + " |" * (len(stats) + 1))
    if llm:
        x = summary["llm"]
        lines += ["", "## LLM scoring", "",
                  f"Model `{x['model']}`: {x['generated']} replies generated, {x['cached']} taken from the cache, "
                  f"{x['unparseable']} unparseable (kept for review in `<dataset>/review.jsonl`)."]
        if x["tiny_model"]:
            lines += ["", "**The scorer is the tiny random model** (no `filter.scorer.path` was given): its scores "
                      "are meaningless and only show that the path runs. Set `filter.scorer.path` to a local "
                      "instruction-tuned LLM for real scores."]
    from omegaconf import OmegaConf

    lines += ["", "## Rules and their settings", "", "| rule | component | settings |", "|---|---|---|"]
    rules = cast(dict, OmegaConf.to_container(cfg.filter.rules, resolve=True) or {})
    for name, spec in rules.items():
        if spec is None:
            continue
        target = spec.pop("_target_", "").rsplit(".", 1)[-1]
        shown = {k: v for k, v in spec.items() if k not in ("prompt", "prompts")}
        cell = json.dumps(shown, ensure_ascii=False).replace("|", "\\|")  # a bar would end the table cell
        lines.append(f"| {name} | {target} | `{cell}` |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "## Examples of each rule", ""]
    for key in sorted(examples):
        lines += [f"### {key}", ""]
        for name, where, reason, snippet in examples[key]:
            shown = {k: v for k, v in reason.items() if k != "rule"}
            lines += [f"- `{where}` ({name}): `{json.dumps(shown, ensure_ascii=False)}`", "", "```text", snippet, "```", ""]
    if not examples:
        lines.append("No rule fired.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
