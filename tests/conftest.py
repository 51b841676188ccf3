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
