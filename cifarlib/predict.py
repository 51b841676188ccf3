"""`python -m cifarlib.predict CHECKPOINT PICTURE ...`: the top classes of your pictures.

The command's face: its code is in `cifarlib.serving.predict`."""

from cifarlib.serving.predict import main

if __name__ == "__main__":
    main()
