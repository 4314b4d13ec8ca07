"""`python -m vlmtrain.plan ...`: same as `vlmtrain plan ...` (`vlmtrain.cli.plan`)."""

from vlmtrain.cli.plan import main

if __name__ == "__main__":
    main()
