"""cifarlib: the library behind the notebooks (data, augmentation, model, training, evaluation).

Each module has one job; see the README for the map.
"""

__version__ = "0.1.0"
