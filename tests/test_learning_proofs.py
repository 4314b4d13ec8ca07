"""experiments/learning_proof: the proofs' plan (which runs each claim starts, with what) and the
summary's scoring of short and long answers; the end-to-end smoke test is the README's CPU command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments" / "learning_proof"))


def load(name):
    spec = importlib.util.spec_from_file_location(f"lp_{name}", REPO / "experiments" / "learning_proof" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_keeps_the_task_and_varies_one_thing_per_claim():
    proofs = load("proofs")
    runs = proofs.plan([1, 3, 4], tiny=False, workers={"claim1": 4, "small": 2})
    assert set(runs) == {"seed1", "seed2", "seed3", "square", "token", "sample", "nojpeg"}
    for s in (1, 2, 3):  # claim 1: the proof's task and settings, only the seed differs
        r = runs[f"seed{s}"]
        assert r["data"] == "main" and "--time-boxed" in r["args"] and f"seed={s}" in r["overrides"]
        assert not any(o.startswith(("loss=", "data.datasets.shapes.jpeg")) for o in r["overrides"])
    small = {n: runs[n] for n in ("square", "token", "sample", "nojpeg")}
    assert {r["args"][r["args"].index("--steps") + 3] for r in small.values()} == {"600"}  # the same steps
    assert [o for o in runs["nojpeg"]["overrides"] if "jpeg" in o] == ["data.datasets.shapes.jpeg_augment=false"]
    assert "--degraded" in runs["square"]["args"] and "--degraded" in runs["nojpeg"]["args"]
    two = proofs.plan([2, 6], tiny=False, workers={"claim1": 4, "small": 2})
    assert two["large_progressive"]["after"] == two["mpo"]["after"] == "small_llm"
    steps = {n: int(two[n]["args"][two[n]["args"].index("--steps") + 3]) for n in ("large_scratch", "large_progressive")}
    assert 2 * steps["large_progressive"] <= steps["large_scratch"]
    assert two["large_progressive"]["model"] == two["large_scratch"]["model"] == proofs.LARGE_LLM
    assert set(proofs.plan([6], tiny=False, workers={"claim1": 4, "small": 2})) == {"small_llm", "mpo"}


def test_length_scores_and_claim_tables(tmp_path):
    summarize = load("summarize")
    rows = [{"group": "one_image/count", "exact_match": 1.0, "reference": "2", "prediction": "2"},
            {"group": "one_image/describe", "exact_match": 0.0, "reference": "red circle, blue square",
             "prediction": "red circle, blue circle"},
            {"group": "text/plus", "exact_match": 0.0, "reference": "3", "prediction": "4"}]
    s = summarize.length_scores(rows)
    assert s["short"] == 1.0 and s["n_short"] == 1 and s["long"] == 0.0 and s["long_items"] == 0.5
    acc = {"image_questions": {"exact_match": 0.95, "chance": 0.37, "count": 600}}
    for n in ("seed1", "seed2", "seed3"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "learning_proof.json").write_text(json.dumps({
            "accuracy": acc, "steps": {"instruction_tuning": 20000}, "steps_done": {"instruction_tuning": 4100},
            "steps_per_s": {"instruction_tuning": 9.5}, "seconds": {"total": 500}}))
    proofs = {"runs": {n: {"rc": 0} for n in ("seed1", "seed2", "seed3")}}
    table = "\n".join(summarize.claim1(tmp_path, proofs))
    assert "| seed2 | 4100 / 20000 | 9.5 | 500 | **95.0** | 37.0 |" in table and "**met**" in table
