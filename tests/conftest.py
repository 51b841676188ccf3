import errno
import os

import pytest

from cifarlib import synthetic


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    """A data_dir holding a small synthetic `cifar-100-python/` (bytes keys, as official)."""
    root = tmp_path_factory.mktemp("c100")
    synthetic.write_cifar100(root / "cifar-100-python", train_per_class=10, test_per_class=4)
    return root


@pytest.fixture(scope="session")
def cifar100_tarball(tmp_path_factory, cifar100_dir):
    """The same dataset as an official-style tarball, in a folder of its own."""
    root = tmp_path_factory.mktemp("c100tar")
    synthetic.pack_tarball(cifar100_dir / "cifar-100-python", root / "cifar-100-python.tar.gz")
    return root / "cifar-100-python.tar.gz"


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """best.pt of a tiny run the suite trains itself (a clean clone has no earlier runs)."""
    from cifarlib import train
    from cifarlib.config import make_config

    root = tmp_path_factory.mktemp("trained")
    cfg = make_config("cpu", dataset="synthetic", weights="none", backbone="resnet18", image_size=32, epochs=3,
                      max_train_samples=600, max_eval_samples=200, data_dir=str(root / "data"),
                      checkpoint_dir=str(root / "ckpt"), run_name="tiny", device="cpu")
    run = train.prepare(cfg)
    for _ in train.epochs(run):
        pass
    return run.dir / "best.pt"


class FillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(room)`: from then on, files that cifarlib writes atomically (through
    `os.fdopen`) fill up after `room` bytes."""
    real = os.fdopen

    def fill_after(room: int) -> None:
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: FillsUp(real(*a, **k), room))
    return fill_after
