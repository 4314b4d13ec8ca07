"""`python -m vlmtrain.pairs ...`: same as `vlmtrain pairs ...` (`vlmtrain.cli.pairs`)."""

from vlmtrain.cli.pairs import main

if __name__ == "__main__":
    main()
