"""Where things are and what runs them: the project root, the device, and the torchrun rank.

Path rule: a relative path given to any cifarlib function (`data_dir`, a checkpoint, a run folder)
is taken relative to the project root (the folder holding `pyproject.toml` and `cifarlib/`), not
to the current directory. So `data/` means the top-level `data/` whether a notebook runs in
JupyterLab (whose working directory is `notebooks/`) or under papermill from the root. Absolute
paths, and `~`, are used as given.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def project_root() -> Path:
    """The checkout that holds this package; the current directory if installed elsewhere."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """Apply the path rule in this module's docstring."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"`/None: the GPU when there is one (CUDA, then Apple MPS), else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: a CUDA GPU's free memory, else the host's
    available RAM (which an Apple GPU shares)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # installed with jupyter; counts reclaimable page cache as available
        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rank() -> int:
    """This process's rank under torchrun (from the environment before the process group
    starts); 0 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (writing files); the other ranks wait, then run it too.

    Rank 0 reaches the barrier even if its block fails, so the others never hang; they then
    find no files and fail with their own clear message.
    """
    if not is_main_process():
        barrier()
        yield
        return
    try:
        yield
    finally:
        barrier()
