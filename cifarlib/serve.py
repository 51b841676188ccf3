"""`python -m cifarlib.serve [--checkpoint PATH]`: notebook 05 as a web page (make app).

The command's face: its code is in `cifarlib.serving.serve`."""

from cifarlib.serving.serve import main

if __name__ == "__main__":
    main()
