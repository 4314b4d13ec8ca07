"""Where a training run's host time goes, from a py-spy raw profile of the run and its loader workers.

    py-spy record --subprocesses --idle --threads -r 25 -f raw -o prof.txt -- python -m vlmtrain ...
    python experiments/bench/pyspy_summary.py prof.txt [--top 25]

Prints, for the main process's main thread and for the loader workers' main threads together, the
seconds spent in each function including its callees (samples / rate), so "waiting for the next
batch" (``_MultiProcessingDataLoaderIter._get_data``), "launching the step" (``training_step``,
``backward``) and the workers' busy (``MixtureDataset.__getitem__``) and idle (``Queue.get``) time
can be read side by side.
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter


def inclusive_seconds(path: str, rate: float) -> dict[str, Counter]:
    """{"main": Counter, "workers": Counter}: function -> seconds on the stack of that role's main thread."""
    out = {"main": Counter(), "workers": Counter()}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            depth = sum(fr.startswith("process ") for fr in frames)  # 1: the run, 2: one of its children
            rest = frames[depth:]
            if depth not in (1, 2) or not rest or "MainThread" not in rest[0]:
                continue
            role = out["main" if depth == 1 else "workers"]
            for name in {fr.split(" (")[0] for fr in rest[1:]}:
                role[name] += int(count) / rate
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="py-spy raw output (-f raw), optionally .gz")
    ap.add_argument("--rate", type=float, default=25.0, help="py-spy's -r (samples per second)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for role, seconds in inclusive_seconds(args.profile, args.rate).items():
        print(f"## {role} (main threads), seconds including callees")
        for name, s in seconds.most_common(args.top):
            print(f"{s:9.1f}  {name}")


if __name__ == "__main__":
    main()
