"""Where a run's pictures live, decided once before they load: on the device, in the host's
memory, or on disk (`place_data`), and the order their batches come in (`resolve_order`).
Both read the free memory from `cifarlib.core.runtime`, and under torchrun rank 0 decides for
every rank. What differs on a device for the pictures bound to it (pinned buffers) stays in
`runtime`, the one module that asks what kind of device it runs on.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import runtime
from .errors import UserError

if TYPE_CHECKING:
    import torch

DATA_ON = ("auto", "device", "host", "disk")
ORDERS = ("auto", "shuffle", "block")


def _gb(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 1e9:.1f} GB"


def place_data(data_on: str, need: int, device: torch.device, cached: bool = True) -> tuple[str, str]:
    """`_place_data`, decided by rank 0 under torchrun and taken by every rank (so that they
    agree, near the threshold too); an error there is every rank's."""
    try:
        decided: Any = _place_data(data_on, need, device, cached) if runtime.is_main_process() else None
    except UserError as e:
        decided = e
    decided = runtime.broadcast_object(decided if runtime.is_main_process() else None)
    if isinstance(decided, UserError):
        raise UserError(str(decided))
    return decided


def _place_data(data_on: str, need: int, device: torch.device, cached: bool = True) -> tuple[str, str]:
    """Where pictures of `need` bytes (uint8) live, and why, in words: on the device (batches are
    slices there), in the host's memory or on disk (the memory-mapped image cache, `cached`:
    image folders have one, CIFAR comes from its pickles); in the last two,
    batches are gathered on the host a few ahead and copied over. The pictures fit in a memory
    when they take at most half of what is free there (the rest is for training); on the device
    they pass through the host on the way, so both must hold them; the host holds one copy for
    each process of this machine under torchrun (`LOCAL_WORLD_SIZE`). `"auto"`: the first place
    where they fit; a place asked for where they do not is a `UserError`."""
    import torch
    if data_on not in DATA_ON:
        raise UserError(f"data_on must be one of {', '.join(DATA_ON)}, not {data_on!r}.")
    dev_free, host_free = runtime.available_memory(device), runtime.available_memory(torch.device("cpu"))
    copies = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fits = lambda free, n=1: free is None or need * n <= free // 2  # noqa: E731
    on_device, on_host = fits(dev_free) and fits(host_free, copies), fits(host_free, copies)
    size, fix = f"{_gb(need)} of pictures", "lower store_size, or pick fewer images with max_train_samples"
    if data_on == "auto":
        if on_device:
            return "device", f"{size} fit in half of the {_gb(dev_free)} free on {device}"
        if on_host and not runtime.is_host(device):
            return "host", (f"{size} are over half of the {_gb(dev_free)} free on {device}, within half of the "
                            f"{_gb(host_free)} free in the host's memory")
        if cached:
            return "disk", f"{size} are over half of the {_gb(min(dev_free or 0, host_free or 0))} free in memory"
        raise UserError(f"{size} are over half of the memory free ({_gb(host_free)}); {fix}.")
    if data_on == "disk" and not cached:
        raise UserError("data_on=disk reads the image cache of dataset=folder; CIFAR's pictures come from its "
                        "files into memory: use data_on=auto, device or host.")
    if (data_on == "device" and not on_device) or (data_on == "host" and not on_host):
        free = min(f for f in (dev_free, host_free) if f is not None) if data_on == "device" else host_free
        raise UserError(f"data_on={data_on}: {size} take more than half of the {_gb(free)} free "
                        f"{'on ' + str(device) if data_on == 'device' else 'in the host' + chr(39) + 's memory'} (the "
                        f"rest is for the model). Use data_on=auto{'' if not cached else ' or disk'}, or {fix}.")
    return data_on, f"data_on={data_on} asked for"


def resolve_order(order: str, data_on: str, need: int) -> str:
    """The batches' order: `"auto"` takes `"block"` (see `cifarlib.data.datasets.Batches`) only
    for pictures on disk that are larger than the host's free memory, whose page cache could not
    hold them: random reads of single pictures would then go to the disk; else `"shuffle"`."""
    import torch
    if order not in ORDERS:
        raise UserError(f"order must be one of {', '.join(ORDERS)}, not {order!r}.")
    if order != "auto":
        return order
    free = runtime.available_memory(torch.device("cpu"))
    return runtime.broadcast_object("block" if data_on == "disk" and free is not None and need > free else "shuffle")  # rank 0's
