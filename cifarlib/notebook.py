"""`python -m cifarlib.notebook NOTEBOOK OUT -p NAME VALUE`: a notebook run headless.

The command's face: its code is in `cifarlib.core.notebook`."""

from cifarlib.core.notebook import main

if __name__ == "__main__":
    main()
