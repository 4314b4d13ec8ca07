"""`python -m vlmtrain.export ...`: same as `vlmtrain export ...` (`vlmtrain.cli.export`)."""

from vlmtrain.cli.export import main

if __name__ == "__main__":
    main()
