"""`python -m cifarlib.train key=value ...`: train from the command line.

The command's face: its code is in `cifarlib.training.train`."""

from cifarlib.training.train import main

if __name__ == "__main__":
    main()
