"""`python -m vlmtrain [group=option ...]`: compose the config and train.

    python -m vlmtrain stage=mlp_warmup                      # tiny model, demo data, CPU
    python -m vlmtrain stage=instruction_tuning init_from=outputs/<date>/<time>
    python -m vlmtrain --cfg job                            # print the composed config
"""

from __future__ import annotations

import sys

from vlmtrain.conf import command


def _train(cfg) -> None:
    from vlmtrain.train import train

    train(cfg)


_main = command("config", "vlmtrain")(_train)


def main() -> None:
    if not any(a.startswith(("hardware=", "+hardware=")) for a in sys.argv[1:]):
        import torch

        if torch.cuda.is_available():
            sys.argv.append("hardware=gpu")  # a visible GPU makes gpu the default hardware
    _main()


if __name__ == "__main__":
    main()
