"""Where things are and what runs them: the project root, the device and its plan, torchrun.

Path rule: a relative path given to any cifarlib function (`data_dir`, a checkpoint, a run folder)
is taken relative to the project root (the folder holding `pyproject.toml` and `cifarlib/`), not
to the current directory. So `data/` means the top-level `data/` whether a notebook runs in
JupyterLab (whose working directory is `notebooks/`) or under papermill from the root. Absolute
paths, and `~`, are used as given; `..` is resolved, so messages show plain paths.

The device plan: what differs between devices (precision, fused optimizer kernels, memory
layout, how often the training loop checks on the device) is decided once, here, by
`resolve_plan`, into a `DevicePlan` that training, evaluation and prediction read. Each choice
is also a setting (`precision`, `fused`, `channels_last`, `check_every`), so the GPU's choices
run, and are tested, on a CPU too. Nothing outside this module asks what kind of device it runs
on: the few things that only CUDA has (cuDNN autotuning, its random states, pinned copies,
NCCL) are here.

Collectives: every all-reduce, broadcast, gather and barrier of cifarlib goes through the helpers
here, which put their tensors on the process group's device (the GPU under NCCL, which refuses
CPU tensors).

torch is imported inside the functions that need it, so that tools that only need paths (such
as `python -m cifarlib.runs`) start without loading it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .ranks import is_main_process, rank  # noqa: F401  (re-exported: where callers look for them)

if TYPE_CHECKING:
    import torch

# Collectives wait this long for a slow rank before failing (NCCL's own default is 10 minutes).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Waiting for rank 0 to download, check and extract data can take far longer on a slow link.
DATA_TIMEOUT = timedelta(hours=6)
# Optimizer steps between the training loop's scheduled checks on a GPU, where each check waits
# for the queue of launched work to drain; on the CPU a check costs nothing, so it runs every step.
CHECK_EVERY_GPU = 50
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PLACES = {"device": "device", "host": "host's memory", "disk": "disk (the memory-mapped image cache)"}


def project_root() -> Path:
    """The checkout that holds this package; the current directory if installed elsewhere."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """Apply the path rule in this module's docstring."""
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else project_root() / p))


# --- the device ----------------------------------------------------------------------------------

def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"`/None: the GPU when there is one (CUDA, then Apple MPS), else the CPU. A device
    that is not there is a `UserError`, given before anything is loaded onto it."""
    import torch
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"device={str(device)!r} is not a device name ({e}); use 'auto', 'cpu', 'cuda', "
                        "'cuda:1' or 'mps'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "none: a CPU-only build of torch"
            raise UserError(f"device={device} asks for a CUDA GPU, and torch sees none on this machine (its CUDA "
                            f"build: {build}). Use device=auto (the CPU here) or device=cpu.")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0.")
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise UserError(f"device={device} asks for Apple's MPS, which this machine does not have. Use device=auto or cpu.")
    return dev


def preset_for(device: str | torch.device | None = "auto") -> tuple[str, str]:
    """The recipe that fits the device a run gets (`preset="auto"`), and why, in words: the
    `original` preset on a CUDA GPU; the `cpu` preset elsewhere (the CPU, Apple's MPS), where the
    original's 100 epochs of ResNet-50 at 224 px would take days."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return "original", f"a CUDA GPU ({dev})"
    return "cpu", f"no CUDA GPU (training on {dev})"


def _mps_available() -> bool:
    import torch
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def is_host(device: torch.device) -> bool:
    """Whether `device` is the host's own CPU, where reading a value back costs no wait."""
    return device.type == "cpu"


@dataclass(frozen=True)
class DevicePlan:
    """What runs how on one device; made by `resolve_plan`, read by training, evaluation and
    prediction. Each field is also a setting of the same name."""
    device: torch.device
    precision: str       # "bf16" or "fp16" autocast (fp16 with a gradient scaler), or "fp32"
    fused: bool          # fused optimizer kernels (one kernel for every parameter's update)
    channels_last: bool  # the model's weights and inputs in NHWC memory layout
    check_every: int     # optimizer steps between the training loop's scheduled checks
    data_on: str = "device"  # where the training pictures live: "device", "host" or "disk" (`cifarlib.core.placement`)
    order: str = "shuffle"   # the batches' order: "shuffle" or "block" (`placement.resolve_order`)
    data_why: str = ""       # why, in words

    @property
    def dtype(self) -> torch.dtype:
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def autocast(self):
        """The forward pass's autocast context (none in fp32)."""
        import torch
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        import torch
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled in fp16, whose small gradients would otherwise underflow; a
        disabled one, which does nothing, otherwise."""
        import torch
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def watches_memory(self) -> bool:
        """Whether training memory is the host's RAM, which nothing frees when it runs out: the
        loop then estimates a step's memory before training and warns (see `guard`)."""
        return is_host(self.device)

    def tune(self) -> None:
        """Before training at fixed shapes: on CUDA, let cuDNN time its kernels once per shape and
        keep the fastest (training batches all have one shape, so the search pays after a few
        steps)."""
        import torch
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device": str(self.device)}

    @property
    def scaler_waits(self) -> bool:
        """fp16 with an unfused optimizer on a device that is not the host: the gradient scaler
        reads its overflow flag back (`.item()`) at every step, a wait on the device. The
        device's own plan never does this (fp16 comes with fused kernels); a user may ask for it."""
        return self.precision == "fp16" and not self.fused and not is_host(self.device)

    def describe(self) -> str:
        return (f"device plan: {self.device}, {self.precision}"
                f"{' with a gradient scaler' if self.precision == 'fp16' else ''}, "
                f"{'fused' if self.fused else 'unfused'} optimizer, {'channels_last' if self.channels_last else 'contiguous'}, "
                f"a check every {self.check_every} optimizer step{'s' if self.check_every != 1 else ''}; "
                f"training pictures on the {PLACES[self.data_on]}, {self.order} order"
                + (f" ({self.data_why})" if self.data_why else "")
                + ("; the unfused optimizer's gradient scaler waits for the device at every step (fused=True avoids it)"
                   if self.scaler_waits else ""))


def _fused_devices() -> list[str]:
    """Device kinds with fused optimizer kernels in this torch (the list torch's optimizers check)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch: the kinds torch 2.4-2.14 support
        return ["cuda", "cpu", "mps"]


def resolve_plan(device: str | torch.device = "auto", precision: str = "auto", fused: bool | str = "auto",
                 channels_last: bool | str = "auto", check_every: int = 0) -> DevicePlan:
    """The plan for `device`: each `"auto"` (or `check_every=0`) becomes the device's own choice,
    and a combination the device cannot run is a `UserError`, given before anything loads.

    The choices: on CUDA, bf16 autocast where the GPU has it natively (compute capability 8.0 and
    up), else fp16 with a gradient scaler; fused optimizers (and wherever fp16 is asked for and the
    device has them: its scaler would otherwise wait for the device at every step); channels_last (fastest for
    convolutions with cuDNN); a check every 50 optimizer steps. On the CPU, fp32 (this
    project's CPUs have no native bf16 or fp16: autocast there is slow); unfused optimizers;
    channels_last (a training step of ResNet-50 at 64 px ran 1.1x faster, of EfficientNet-Lite0
    1.7x: benchmarks/bench_layout.py); a check every step, which costs nothing. On Apple's MPS,
    fp32, unfused, the default layout (MPS supports channels_last unevenly), every 50 steps.
    """
    import torch
    dev = pick_device(device)
    cuda = dev.type == "cuda"
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    if precision == "auto":
        precision = ("bf16" if torch.cuda.get_device_capability(dev) >= (8, 0) else "fp16") if cuda else "fp32"
    elif precision == "bf16" and cuda and torch.cuda.get_device_capability(dev) < (8, 0):
        raise UserError(f"precision=bf16: {torch.cuda.get_device_name(dev)} has no native bf16 (compute capability "
                        "below 8.0). Use precision=fp16 (with a gradient scaler) or fp32.")
    elif precision != "fp32" and not torch.amp.is_autocast_available(dev.type):
        raise UserError(f"precision={precision}: torch has no autocast for {dev.type} devices. Use precision=fp32.")
    for name, value in (("fused", fused), ("channels_last", channels_last)):
        if value != "auto" and not isinstance(value, bool):
            raise UserError(f"{name} must be 'auto', True or False, not {value!r}.")
    if fused == "auto":  # and with fp16 wherever it can: an unfused step's scaler reads its overflow flag back
        fused = cuda or (precision == "fp16" and dev.type in _fused_devices())
    elif fused and dev.type not in _fused_devices():
        raise UserError(f"fused=True: this torch has no fused optimizer kernels for {dev.type} devices "
                        f"(it has them for {', '.join(_fused_devices())}). Use fused=False or auto.")
    if channels_last == "auto":
        channels_last = dev.type in ("cuda", "cpu")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
        raise UserError(f"check_every must be 0 (the device's choice) or a number of optimizer steps, not {check_every!r}.")
    check_every = check_every or (1 if is_host(dev) else CHECK_EVERY_GPU)
    return DevicePlan(dev, precision, bool(fused), bool(channels_last), check_every)


@functools.lru_cache(maxsize=None)
def _auto_plan(device: str) -> DevicePlan:
    return resolve_plan(device)


def auto_plan(device: str | torch.device) -> DevicePlan:
    """The device's own plan (every setting "auto"): what evaluation and prediction run with."""
    return _auto_plan(str(device))


def cache_chunk(device: torch.device) -> int | None:
    """How many full-size images batch augmentation finishes at a time: on the CPU, 16, so that a
    chunk stays in the L3 cache from one in-place pass to the next (fresh allocations of a whole
    batch cost more than the arithmetic there); elsewhere None, the whole batch in one pass."""
    return 16 if is_host(device) else None


def may_read_back(device: torch.device) -> bool:
    """Whether code may read a value on `device` back to the host to save work: free on the CPU;
    on a GPU it makes the host wait for the queue of launched work."""
    return is_host(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the CPU) copied to `device` without making the host wait: through pinned memory
    with a non-blocking copy on CUDA; a plain copy elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def rng_state(device: torch.device):
    """The device's own random state (CUDA's generator), or None where the CPU's serves."""
    import torch
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state) -> None:
    import torch
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DistributedDataParallel's `device_ids`: the GPU's index on CUDA, None on the CPU."""
    return [device.index] if device.type == "cuda" else None


def memory_text(device: torch.device) -> str:
    """The device's memory, in words, for messages about running out of it."""
    import torch
    if device.type == "cuda":
        return f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
    if device.type == "mps":
        return f"{torch.mps.recommended_max_memory() / 2**30:.1f} GiB" if hasattr(torch.mps, "recommended_max_memory") else "its"
    have = available_memory(device)
    return f"{have / 2**30:.1f} GiB available" if have else "its"


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


# --- pictures bound for a device (where they live: `cifarlib.core.placement`) ----------------

def host_empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An empty uint8 tensor in the host's memory, for pictures bound for `device`: pinned on
    CUDA, so that the copy over needs no wait (and no second copy into pinned memory)."""
    import torch
    return torch.empty(shape, dtype=torch.uint8, pin_memory=device.type == "cuda")


# --- torchrun ------------------------------------------------------------------------------------

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


def distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if distributed() else 1


def group_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the current GPU under
    NCCL, which refuses CPU tensors; the CPU under gloo."""
    import torch
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the ranks ("sum", "max" or "min"), on the process group's device (the
    input is left as it was); `t` itself when not distributed."""
    import torch.distributed as dist
    if not distributed():
        return t
    out = t.to(group_device(), copy=True)
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out


def sum_over_ranks(*values: torch.Tensor | float) -> list[float]:
    """Each value summed over the ranks (one all-reduce), as floats: a host wait."""
    import torch
    on = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=on) for v in values])
    return all_reduce(t).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any."""
    import torch
    if not distributed():
        return flag
    return bool(all_reduce(torch.tensor([int(flag)]), "max").item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    import torch.distributed as dist
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_DATA_GROUP: list = []


def barrier() -> None:
    """Wait for every rank. It runs on a gloo group of its own with a long timeout, so that rank 0
    may download and extract data (`main_process_first`) while the others wait."""
    import torch.distributed as dist
    if distributed():
        if not _DATA_GROUP:
            _DATA_GROUP.append(dist.new_group(backend="gloo", timeout=DATA_TIMEOUT))
        dist.barrier(group=_DATA_GROUP[0])


@contextlib.contextmanager
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
