"""`python -m vlmtrain.shard ...`: same as `vlmtrain shard ...` (`vlmtrain.cli.shard`)."""

from vlmtrain.cli.shard import main

if __name__ == "__main__":
    main()
