"""The names a folder of cifarlib hands on, imported only when first used (PEP 562).

    # cifarlib/model/__init__.py
    __getattr__, __dir__, __all__ = lazy.exports(__name__, {"backbones": ["build_model"], ...})

Why not plain imports in each folder's `__init__.py`: importing any module of a folder runs its
`__init__.py` first, and the app's pages read pictures (`cifarlib.data.pictures`) and draw maps
(`cifarlib.evaluation.heatmap`) without torch. An `__init__.py` that imported the folder's
torch-backed modules would load torch into every page. Why not the `lazy_loader` package: these
dozen lines do what is needed, and a folder's names stay readable in its own `__init__.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable


def exports(package: str, modules: dict[str, list[str]]) -> tuple[Callable, Callable, list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose `modules` (by module name
    within it) each hand on the names listed. A name is imported from its module on first use,
    then kept in the package. A name may not be a module's own name: once that module is imported,
    Python sets the package's attribute to the module, which would hide the name."""
    home = {name: module for module, names in modules.items() for name in names}
    clash = sorted(set(home) & {m.name for m in pkgutil.iter_modules(sys.modules[package].__path__)})
    assert not clash, f"{package} hands on names that are also its modules' names: {clash}"

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__, sorted(home)
