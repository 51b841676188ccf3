"""Under torchrun, only rank 0 writes data files; the other ranks wait for it, then read them."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cifarlib import data, synthetic


def _worker(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    real_write = synthetic.write_cifar100

    def recording_write(folder, *args, **kwargs):
        with open(f"{root}/writers", "a") as f:
            f.write(f"{rank}\n")
        return real_write(folder, *args, **kwargs)
    data.synthetic.write_cifar100 = recording_write
    d = data.load_cifar("synthetic", f"{root}/data", device="cpu")
    torch.save({"train": d.train.labels, "val": d.val.images.sum()}, f"{root}/rank{rank}.pt")
    dist.destroy_process_group()


def test_only_rank_zero_writes_and_all_ranks_read_the_same(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "writers").read_text() == "0\n"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["train"], r1["train"]) and r0["val"] == r1["val"]
