"""`python -m cifarlib.export CHECKPOINT [--cams]`: a checkpoint as ONNX.

The command's face: its code is in `cifarlib.serving.export`."""

from cifarlib.serving.export import main

if __name__ == "__main__":
    main()
