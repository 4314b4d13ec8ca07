"""`python -m vlmtrain.stats ...`: same as `vlmtrain stats ...` (`vlmtrain.cli.stats`)."""

from vlmtrain.cli.stats import main

if __name__ == "__main__":
    main()
