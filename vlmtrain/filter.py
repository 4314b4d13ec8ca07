"""`python -m vlmtrain.filter ...`: same as `vlmtrain filter ...` (`vlmtrain.cli.filter`)."""

from vlmtrain.cli.filter import main

if __name__ == "__main__":
    main()
