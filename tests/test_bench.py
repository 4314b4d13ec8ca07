"""The throughput bench on the CPU (tiny model): every row trains through its real path and reports
positive figures; the trainer row sees exactly the samples the other rows time."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "experiments/bench/throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_rows_on_cpu(tmp_path):
    bench = load_bench()
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    results = bench.main(["--device", "cpu", "--steps", "1", "--warmup", "1", "--samples-per-step", "2",
                          "--text", "10", "30", "--peak-tflops", "1", "--data-dir", str(tmp_path / "work"),
                          "--out", str(out), "--md", str(md), "data.num_workers=1"])
    assert json.loads(out.read_text())["rows"].keys() == set(bench.ROWS)
    rows = results["rows"]
    for name in bench.ROWS:
        r = rows[name]
        assert "error" not in r and "skipped" not in r, (name, r)
        assert r["tokens_per_s"] > 0 and r["step_seconds"] > 0 and r["tflops"] > 0 and r["mfu"] > 0, (name, r)
    assert rows["trainer"]["tokens_seen"] == results["pool"]["tokens_timed"]  # the same samples as the other rows
    assert 0 <= rows["trainer"]["host_wait_share"] < 1
    assert rows["hf_strong"]["attention_backend"] == "sdpa" and not rows["hf_strong"]["compiled"]
    table = md.read_text()
    assert all(bench.LABELS[name] in table for name in bench.ROWS)
