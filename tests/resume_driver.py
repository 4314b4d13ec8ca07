"""One training run in a process of its own, for tests/test_resume.py: the real command line
(``vlmtrain.cli.start``: Hydra, exit codes) plus a callback that records every step this process
trains (global step, data hash, loss) to ``<run_dir>/steps.jsonl`` and can interrupt the run.

    python tests/resume_driver.py RUN_DIR [--kill9 K | --group-sigterm K] [overrides...]

``--kill9 K``: SIGKILL this process at the start of the step after step K (its checkpoint written,
nothing else: no handler, no cleanup, loader workers orphaned). ``--group-sigterm K``: while step K
runs, SIGTERM the whole process group, loader workers included (what a scheduler sends).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    def __init__(self, path: Path, kill9: int | None, group_sigterm: int | None):
        self.path, self.kill9, self.group_sigterm = path, kill9, group_sigterm

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill9 is not None and trainer.global_step == self.kill9:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.group_sigterm is not None and trainer.global_step == self.group_sigterm - 1:
            os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(1.0)  # a worker that dies of it is noticed (SIGCHLD) while this step runs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = hashlib.sha1()
        for mb in batch.micro_batches:
            h.update(mb.input_ids.numpy().tobytes())
            h.update(mb.pixel_values.numpy().tobytes())
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "data": h.hexdigest(),
               "loss": float(trainer.callback_metrics["train/loss"])}
        with open(self.path, "a") as f:  # written before a kill can come: flushed and synced
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def main() -> None:
    run_dir, args = Path(sys.argv[1]), sys.argv[2:]
    kill9 = group_sigterm = None
    if args and args[0] in ("--kill9", "--group-sigterm"):
        flag, k, args = args[0], int(args[1]), args[2:]
        kill9, group_sigterm = (k, None) if flag == "--kill9" else (None, k)
    run_dir.mkdir(parents=True, exist_ok=True)

    import vlmtrain.training.run as run
    from vlmtrain.cli import start
    from vlmtrain.cli.train import COMMAND

    real = run.build_trainer

    def with_log(cfg, rd, *rest):
        trainer = real(cfg, rd, *rest)
        trainer.callbacks.insert(0, StepLog(run_dir / "steps.jsonl", kill9, group_sigterm))
        return trainer

    run.build_trainer = with_log
    start(COMMAND, [*args, f"hydra.run.dir={run_dir}"])


if __name__ == "__main__":
    main()
