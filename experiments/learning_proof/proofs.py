"""Several learning proofs at once on one GPU, each a ``run.py`` process with its own time box
(issue 22). One call generates the shared data (and its pre-tiled images), starts the proofs
concurrently, waits, and leaves one ``learning_proof.json`` per run under ``--out/<run>/`` plus
``proofs.json`` (what ran, exit codes, timings). ``summarize.py`` turns that into markdown.

    python3 experiments/learning_proof/proofs.py --out $OUT --claims 1 3 4     # one H200, < 9.5 min
    nice python experiments/learning_proof/proofs.py --out /tmp/p --device cpu --tiny   # smoke, CPU

Claims (the runs each starts):
- 1 robust margin: ``seed1..3``, the learning proof (three stages, the full question mix, random JPEG
  on, square averaging) with the stage-2 cosine time-boxed (``--time-boxed``: it completes when the
  time is up instead of being cut on a slow host) and trained from pre-tiled images
  (``--tile-cache``: decode and resize once; the JPEG augmentation still runs per sample).
- 3 loss averaging: ``square``, ``token``, ``sample``: the same stages, a fixed number of stage-2
  steps, on a mix where a share of the single-image lines ask for every shape left to right (a long
  answer, ``one_image/describe``; ``--describe``), scored per question kind (short kinds vs describe).
- 4 random JPEG: ``square`` (JPEG on) against ``nojpeg`` (the same with
  ``data.datasets.shapes.jpeg_augment=false``), both also scored on the held-out images re-encoded
  at quality 30-60 (``--degraded 30 60``).

- 2 progressive scaling: ``small_llm`` (the proof, fixed stage-2 steps) and ``large_scratch`` (the same
  ViT on a 768 x 12 LLM, ``--scratch-steps``) start together; when ``small_llm`` ends,
  ``large_progressive`` takes its ViT (``--init-from ... --init-parts vision_tower``) onto a fresh
  768 x 12 LLM and runs only MLP warmup + stage 2 with half the scratch run's stage-2 steps. No
  pretrained LLM exists here: both large runs start their LLM from random weights, so what moves is
  the ViT alone, and its stage-1.5 training is the small model's whole pipeline (a stage 1.5 with a
  frozen random LLM teaches the ViT little).

Every run gets ``--budget`` = the seconds left of this script's ``--budget`` after data
generation: training stops in time to evaluate, so the call ends within ``--budget``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

TINY_MODEL = [
    "model.vision.hidden_size=32", "model.vision.num_hidden_layers=1", "model.vision.intermediate_size=64",
    "model.vision.num_attention_heads=2", "model.llm.config.hidden_size=32", "model.llm.config.num_hidden_layers=1",
    "model.llm.config.intermediate_size=64", "model.llm.config.num_attention_heads=2",
    "model.llm.config.num_key_value_heads=1",
]
LARGE_LLM = ["model.llm.config.hidden_size=768", "model.llm.config.num_hidden_layers=12",
             "model.llm.config.num_attention_heads=12", "model.llm.config.num_key_value_heads=4",
             "model.llm.config.intermediate_size=2048"]
"""Claim 2's larger LLM: 768 x 12 (about 90M parameters) against the proof's 512 x 8 (26M)."""
MPO_SCRIPT = REPO / "experiments" / "preference" / "gpu_mpo_after_sft.py"
"""Claim 6 (the mpo engineer's script): pairs from an SFT checkpoint, MPO, exact match of both."""
CPU = ["hardware=cpu", "model.compile=[]", "data/collate=padded", "~data.collate.max_tokens", "~data.collate.max_tiles",
       "data.micro_batch_size=8", "stage.global_batch_size=8", "data.persistent_workers=false",
       "trainer.log_every_n_steps=1"]


def plan(claims: list[int], tiny: bool, workers: dict[str, int], small_steps: int = 600,
         scratch_steps: int = 2000, small_llm_steps: int = 1500) -> dict[str, dict]:
    """name -> {data: main|describe, args: run.py arguments, overrides}."""
    s2_cap, s2_fixed = ("6", "4") if tiny else ("20000", str(small_steps))
    stages = ["--steps", "2", "2"] if tiny else ["--steps", "60", "150"]
    runs: dict[str, dict] = {}
    if 1 in claims:
        for seed in (1, 2, 3):
            runs[f"seed{seed}"] = {"data": "main", "args": [*stages, s2_cap, "--time-boxed", "--tile-cache"],
                                   "overrides": [f"seed={seed}", f"data.num_workers={workers['claim1']}"]}
    small = {"data": "describe", "eval_reserve": 2.0, "args": [*stages, s2_fixed, "--tile-cache", "--max-new-tokens", "32"]}
    if 3 in claims or 4 in claims:
        runs["square"] = {**small, "args": [*small["args"], "--degraded", "30", "60"],
                          "overrides": ["loss=square", f"data.num_workers={workers['small']}"]}
    if 3 in claims:
        for loss in ("token", "sample"):
            runs[loss] = {**small, "overrides": [f"loss={loss}", f"data.num_workers={workers['small']}"]}
    if 4 in claims:
        runs["nojpeg"] = {**small, "args": [*small["args"], "--degraded", "30", "60"],
                          "overrides": ["loss=square", "data.datasets.shapes.jpeg_augment=false",
                                        f"data.num_workers={workers['small']}"]}
    if 2 in claims or 6 in claims:
        large = ["model.llm.config.hidden_size=48", "model.llm.config.intermediate_size=96"] if tiny else LARGE_LLM
        n = 4 if tiny else scratch_steps
        common = {"data": "main", "overrides": [f"data.num_workers={workers['claim1']}"]}
        runs["small_llm"] = {**common, "args": [*stages, str(4 if tiny else small_llm_steps), "--tile-cache"]}
        runs["large_scratch"] = {**common, "args": [*stages, str(n), "--tile-cache"], "model": large}
        runs["large_progressive"] = {**common, "after": "small_llm", "model": large,
                                     "args": [*stages, str(max(1, n // 2)), "--tile-cache",
                                              "--stages", "mlp_warmup", "instruction_tuning"]}
        if 2 not in claims:  # claim 6 alone needs only the SFT checkpoint
            del runs["large_scratch"], runs["large_progressive"]
    if 6 in claims:
        runs["mpo"] = {"data": "main", "after": "small_llm", "script": MPO_SCRIPT}
    return runs


def scratch_dir(need_gb: float) -> Path:
    """/dev/shm when it has room (the tile cache then lives in memory), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free / 1e9 > need_gb:
        return shm / "lp_proofs"
    return Path("/tmp/lp_proofs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", help="data and checkpoints (default: /dev/shm/lp_proofs if it has room, else /tmp)")
    ap.add_argument("--claims", type=int, nargs="+", default=[1, 3, 4], choices=[1, 2, 3, 4, 6])
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for this whole script")
    ap.add_argument("--eval-reserve", type=float, default=60.0,
                    help="each run's seconds for evaluation (concurrent evaluations share the GPU; the claim 3 "
                         "and 4 runs, which also evaluate degraded images or long answers, get twice this)")
    ap.add_argument("--train", type=int, default=150000, help="train lines of the main data (claim 1)")
    ap.add_argument("--train-describe", type=int, default=50000, help="train lines of the describe data (claims 3, 4)")
    ap.add_argument("--describe", type=float, default=0.3, help="share of single-image lines asking for a long answer")
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke test: tiny model, data and steps")
    ap.add_argument("--small-steps", type=int, default=600,
                    help="stage-2 steps of the claim 3 and 4 runs (batch 256: 700 steps scored 78% alone on an H200)")
    ap.add_argument("--scratch-steps", type=int, default=2000,
                    help="claim 2: stage-2 steps of the larger model from scratch (the progressive run gets half)")
    ap.add_argument("--small-llm-steps", type=int, default=1500, help="claim 2: stage-2 steps of the small model")
    ap.add_argument("--mpo-questions", type=int, default=6000,
                    help="claim 6: training questions the SFT checkpoint answers for pairs (the script's --questions)")
    ap.add_argument("--only", nargs="+", help="start only these runs of the plan")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    if args.tiny:
        args.train, args.train_describe, args.heldout = 120, 120, 16
    runs = plan(args.claims, args.tiny, {"claim1": 1 if args.tiny else 4, "small": 1 if args.tiny else 2},
                args.small_steps, args.scratch_steps, args.small_llm_steps)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    work = Path(args.work) if args.work else scratch_dir(0.17 * (args.train + args.train_describe) / 1000 + 1.5 * len(runs))
    work.mkdir(parents=True, exist_ok=True)

    from run import make_data

    t = time.time()
    data = {"main": work / "data_main", "describe": work / "data_describe"}
    gen = {"main": (args.train, 0.0), "describe": (args.train_describe, args.describe)}
    for name in {r["data"] for r in runs.values()}:
        make_data(data[name], gen[name][0], args.heldout, cores, describe=gen[name][1], tile_cache=True)
    data_s = time.time() - t
    print(f"data: {data_s:.0f}s ({work})", flush=True)

    extra = ["--device", "cpu"] if args.device == "cpu" else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TORCHINDUCTOR_COMPILE_THREADS=str(max(1, min(4, cores // max(1, len(runs))))))
    # packed steps vary in length: without expandable segments the cached blocks fragment, and seven
    # runs held 23-30 GiB each in stage 1.5 until two died of OOM (2026-12-02, one H200)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def launch(name: str, r: dict):
        left = args.budget - (time.time() - t0) - 10
        (out / name).mkdir(parents=True, exist_ok=True)
        if r.get("script"):
            # the script reads <lp>/data/annotations{,_val}.jsonl and the SFT run <lp>/instruction_tuning
            lp = work / f"{name}_lp"
            lp.mkdir(parents=True, exist_ok=True)
            for link, target in (("data", data[r["data"]]), ("instruction_tuning", work / r["after"] / "instruction_tuning")):
                if not (lp / link).exists():
                    (lp / link).symlink_to(target)
            missing = [str(p) for p in (lp / "data" / "annotations.jsonl", lp / "data" / "annotations_val.jsonl",
                                        lp / "instruction_tuning" / "checkpoints") if not p.exists()]
            if missing:
                raise SystemExit(f"{name}: {r['script']} needs {missing}")
            # the script runs on cuda only: the CPU smoke test checks the layout and its arguments
            cmd = [sys.executable, str(r["script"]), "--lp", str(lp), "--out", str(out / name),
                   "--questions", str(args.mpo_questions)] + (["--help"] if args.tiny else [])
        else:
            cmd = [sys.executable, str(HERE / "run.py"), "--out", str(out / name), "--work", str(work / name),
                   "--data", str(data[r["data"]]), "--budget", f"{left:.0f}",
                   "--eval-reserve", f"{args.eval_reserve * r.get('eval_reserve', 1.0):.0f}",
                   "--heldout", str(args.heldout), "--gen-procs", str(cores), *r["args"], *extra]
            cmd += ["--train", str(gen[r["data"]][0])] + (["--describe", str(args.describe)] if r["data"] == "describe" else [])
            cmd += ["--prune-checkpoints", "--startup", "5"] + (["--eval-batch", "16"] if args.tiny else [])
            if r.get("after"):
                cmd += ["--init-from", str(work / r["after"] / "instruction_tuning")]
            cmd += r["overrides"] + (TINY_MODEL + CPU if args.tiny else []) + r.get("model", [])
        log = open(out / name / "run.log", "w")
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log, cmd, time.time()

    result = {"budget": args.budget, "data_seconds": data_s, "work": str(work), "claims": args.claims, "runs": {}}
    waiting = {n: r for n, r in runs.items() if r.get("after") in runs}
    procs = {n: launch(n, r) for n, r in runs.items() if n not in waiting}
    while procs:
        for name in list(procs):
            p, log, cmd, started = procs[name]
            rc = p.poll()
            if rc is None and time.time() - t0 > args.budget + 15:  # past the budget: stop it, keep the others' results
                p.terminate()
                try:
                    rc = p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
                print(f"{name}: stopped at the budget", flush=True)
            if rc is None:
                continue
            del procs[name]
            log.close()
            result["runs"][name] = {"rc": rc, "seconds": time.time() - started, "cmd": cmd[1:]}
            tail = (out / name / "run.log").read_text().splitlines()[-3:]
            print(f"{name}: exit {rc} after {time.time() - t0:.0f}s; {' | '.join(tail)}", flush=True)
            for dep in [n for n, r in waiting.items() if r["after"] == name]:
                r = waiting.pop(dep)
                if rc == 0:
                    try:
                        procs[dep] = launch(dep, r)
                    except SystemExit as e:
                        print(e, flush=True)
                        result["runs"][dep] = {"rc": f"not started: {e}", "seconds": 0, "cmd": []}
                else:
                    result["runs"][dep] = {"rc": f"not started: {name} failed", "seconds": 0, "cmd": []}
        time.sleep(1)
    result["total_seconds"] = time.time() - t0
    result["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    (out / "proofs.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['total_seconds']:.0f}s", flush=True)
    sys.exit(int(any(r["rc"] != 0 for r in result["runs"].values())))


if __name__ == "__main__":
    main()
