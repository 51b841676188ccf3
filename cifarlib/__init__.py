"""cifarlib: the library behind the notebooks, in six folders by job. Each imports only the
folders above it in this list, never one below it, and no module imports one that imports it back:

    core         the ground: paths, devices and their plans, torchrun, errors, files, figures
    data         pictures and labels: CIFAR and folders read, split, cached, augmented on the device
    model        backbones, checkpoints, and the one evaluation path (images to class scores)
    training     settings and presets, the budget, the loop, saves, early stopping, live curves
    evaluation   metrics, where the model looked, the notebooks' figures, runs compared
    serving      predictions, the ONNX export, the web app

A folder's `__init__.py` names what the folder offers (`from cifarlib.data import load_cifar`)
and imports it only when it is first used, so that a module that needs no torch never loads it.
The commands are the thin modules at this level: `python -m cifarlib.train`, `.runs`,
`.predict`, `.export`, `.serve`, `.notebook` and `.data`.
"""

__version__ = "0.1.0"
