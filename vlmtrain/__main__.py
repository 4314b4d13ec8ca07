"""`python -m vlmtrain [verb] [group=option ...]`: same as the `vlmtrain` console script; no verb
means train (`python -m vlmtrain stage=mlp_warmup`). See ``vlmtrain.cli``.

    python -m vlmtrain stage=mlp_warmup                      # tiny model, demo data, CPU
    python -m vlmtrain eval ckpt=outputs/<date>/<time>       # = python -m vlmtrain.eval ...
    python -m vlmtrain --cfg job                            # print the composed config
"""

from vlmtrain.cli import main

if __name__ == "__main__":
    main()
