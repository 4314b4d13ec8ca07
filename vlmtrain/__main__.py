"""`python -m vlmtrain [group=option ...]`: compose the config and train.

    python -m vlmtrain stage=mlp_warmup                      # tiny model, demo data, CPU
    python -m vlmtrain stage=instruction_tuning init_from=outputs/<date>/<time>
    python -m vlmtrain --cfg job                            # print the composed config
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from vlmtrain.conf import CONFIG_DIR, register


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from vlmtrain.train import train

    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("VLMTRAIN_DEBUG"):
            raise
        print(f"vlmtrain: error: {e}", file=sys.stderr)  # bad input: one line naming key or path
        sys.exit(2)


def main() -> None:
    register()
    args = sys.argv[1:]
    if not any(a.startswith(("hardware=", "+hardware=")) for a in args):
        import torch

        if torch.cuda.is_available():
            sys.argv.append("hardware=gpu")  # a visible GPU makes gpu the default hardware
    _run()


if __name__ == "__main__":
    main()
