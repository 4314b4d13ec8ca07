"""`python -m vlmtrain.eval ...`: same as `vlmtrain eval ...` (`vlmtrain.cli.eval`)."""

from vlmtrain.cli.eval import main

if __name__ == "__main__":
    main()
