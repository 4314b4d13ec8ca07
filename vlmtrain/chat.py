"""`python -m vlmtrain.chat ...`: same as `vlmtrain chat ...` (`vlmtrain.cli.chat`)."""

from vlmtrain.cli.chat import main

if __name__ == "__main__":
    main()
