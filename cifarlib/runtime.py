"""Where things are and what runs them: the project root, the device, precision, and torchrun.

Path rule: a relative path given to any cifarlib function (`data_dir`, a checkpoint, a run folder)
is taken relative to the project root (the folder holding `pyproject.toml` and `cifarlib/`), not
to the current directory. So `data/` means the top-level `data/` whether a notebook runs in
JupyterLab (whose working directory is `notebooks/`) or under papermill from the root. Absolute
paths, and `~`, are used as given.

torch is imported inside the functions that need it, so that tools that only need paths (such
as `python -m cifarlib.runs`) start without loading it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

# Collectives wait this long for a slow rank before failing (NCCL's own default is 10 minutes).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Waiting for rank 0 to download, check and extract data can take far longer on a slow link.
DATA_TIMEOUT = timedelta(hours=6)


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
    import torch
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def autocast(device: torch.device):
    """(context, dtype): bf16 autocast on CUDA GPUs that have it natively (compute capability 8.0
    and up), fp16 on older ones (training pairs it with a gradient scaler), and no autocast, in
    fp32, elsewhere. Training, evaluation and prediction all run through this one choice."""
    import torch
    if device.type != "cuda":
        return contextlib.nullcontext(), torch.float32
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA and on the CPU, where convolutions run fastest in it (on this
    project's 2-core CPU, a training step of ResNet-50 at 64 px ran 1.1x faster, of
    EfficientNet-Lite0 1.7x: benchmarks/bench_layout.py); the default on others (Apple's MPS supports
    it unevenly)."""
    import torch
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.preserve_format


def tune_for_fixed_shapes(device: torch.device) -> None:
    """On CUDA, let cuDNN time its kernels once per shape and keep the fastest: training batches
    all have one shape, so the search pays for itself after a few steps."""
    import torch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def setup_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns (rank, world size).

    The backend follows the device the run will use (NCCL for CUDA, gloo otherwise, so
    `device=cpu` works on a machine with GPUs too). On CUDA each process takes the GPU of its
    LOCAL_RANK, set before the group starts.
    """
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        kwargs = {}
        cuda = pick_device(device).type == "cuda"
        if cuda:
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= count:
                raise UserError(f"LOCAL_RANK={local}, but this machine has {count} CUDA device(s): start "
                                f"at most {count} processes per node (torchrun --nproc_per_node={count}).")
            torch.cuda.set_device(local)
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: a CUDA GPU's free memory, else the host's
    available RAM (which an Apple GPU shares); None if it can't be known."""
    import torch
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # installed with jupyter; counts reclaimable page cache as available
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:  # Linux's MemAvailable: the same count
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def rank() -> int:
    """This process's rank under torchrun (from the environment before the process group
    starts); 0 when not distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


_DATA_GROUP: list = []


def barrier() -> None:
    """Wait for every rank. It runs on a gloo group of its own with a long timeout, so that rank 0
    may download and extract data (`main_process_first`) while the others wait."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if not _DATA_GROUP:
            _DATA_GROUP.append(dist.new_group(backend="gloo", timeout=DATA_TIMEOUT))
        dist.barrier(group=_DATA_GROUP[0])


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
