"""`python -m vlmtrain.preview ...`: same as `vlmtrain preview ...` (`vlmtrain.cli.preview`)."""

from vlmtrain.cli.preview import main

if __name__ == "__main__":
    main()
