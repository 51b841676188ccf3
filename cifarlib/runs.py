"""`python -m cifarlib.runs [--checkpoint-dir DIR] [--csv PATH]`: every run in one table.

The command's face: its code is in `cifarlib.evaluation.runs`."""

from cifarlib.evaluation.runs import main

if __name__ == "__main__":
    main()
