"""Under torchrun, only rank 0 writes data files; the other ranks wait for it, then read them."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cifarlib.data import datasets as data, synthetic


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


def _folder_worker(rank: int, world: int, root: str) -> None:
    from cifarlib.data import imagecache
    dist.init_process_group("gloo", init_method=f"file://{root}/store2", rank=rank, world_size=world)
    real_decode = imagecache.decode

    def recording_decode(files, size, **kw):
        with open(f"{root}/decoders", "a") as f:
            f.write(f"{rank}\n")
        return real_decode(files, size, **kw)
    imagecache.decode = recording_decode
    d = data.load_cifar("folder", f"{root}/photos.tar", cache_dir=f"{root}/cache", device="cpu")
    torch.save({"train": d.train.images, "val": d.val.labels}, f"{root}/folder{rank}.pt")
    dist.destroy_process_group()


def test_a_folder_archive_is_extracted_and_decoded_by_rank_zero_alone(tmp_path):
    import tarfile
    from PIL import Image
    for c, colour in enumerate(("red", "blue")):
        (tmp_path / "photos" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "photos" / f"class{c}" / f"{i}.png")
    with tarfile.open(tmp_path / "photos.tar", "w") as tf:
        tf.add(tmp_path / "photos", "photos")
    mp.spawn(_folder_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "decoders").read_text() == "0\n"  # rank 1 found everything in the cache
    r0, r1 = (torch.load(tmp_path / f"folder{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["train"], r1["train"]) and torch.equal(r0["val"], r1["val"])
