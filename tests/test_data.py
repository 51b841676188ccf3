"""The data layer: sources, checksums, errors, splits, subsets, batches and names."""

import errno
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from cifarlib.core import runtime
from cifarlib.core.errors import UserError
from cifarlib.data import datasets as data, sources, synthetic
from cifarlib.data.datasets import Batches, Split, load_cifar, split_train_val, stratified_pick

LOAD = dict(verify_checksums=False, download=False, device="cpu")


def assert_same(a: data.CifarData, b: data.CifarData):
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    assert a.classes == b.classes and a.superclasses == b.superclasses


def test_folder_loads_with_names_shapes_and_dtypes(cifar100_dir):
    d = load_cifar("cifar100", cifar100_dir, **LOAD)
    assert d.num_classes == 100 and len(d.superclasses) == 20
    assert (len(d.train), len(d.val), len(d.test)) == (900, 100, 400)
    assert d.train.images.shape == (900, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.train.labels.dtype == torch.int64 and d.train.coarse_labels.shape == (900,)
    apple = d.classes.index("apple")
    assert d.superclasses[d.fine_to_coarse[apple]] == "fruit_and_vegetables"
    assert d.superclasses[d.fine_to_coarse[d.classes.index("dolphin")]] == "aquatic_mammals"
    # every coarse label agrees with the fine-to-coarse table
    assert torch.equal(d.fine_to_coarse[d.test.labels], d.test.coarse_labels)


def test_str_keys_from_python3_rebuilt_files_load_the_same(tmp_path, cifar100_dir):
    synthetic.write_cifar100(tmp_path / "cifar-100-python", train_per_class=10, test_per_class=4,
                             str_keys=True)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        assert "data" in pickle.load(f)  # really str keys
    assert_same(load_cifar("cifar100", tmp_path, **LOAD), load_cifar("cifar100", cifar100_dir, **LOAD))


def test_images_keep_the_official_row_layout(tmp_path):
    # official rows: 1024 red values, then 1024 green, then 1024 blue, row-major
    synthetic.write_cifar100(tmp_path / "cifar-100-python", train_per_class=1, test_per_class=1)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    row = raw[b"data"][0]
    img = load_cifar("cifar100", tmp_path, val_fraction=0, **LOAD).test.images[0]
    assert img[0, 0, 1] == row[1] and img[1, 0, 0] == row[1024] and img[2, 31, 31] == row[3071]
    assert torch.equal(img.flatten(), torch.from_numpy(row))


def test_cifar10_loads_without_superclasses(tmp_path):
    synthetic.write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_cifar("cifar10", tmp_path, **LOAD)
    assert d.classes[0] == "airplane" and d.num_classes == 10
    assert d.superclasses is None and d.fine_to_coarse is None and d.train.coarse_labels is None
    assert (len(d.train) + len(d.val), len(d.test)) == (200, 50)


def test_synthetic_is_written_once_and_reused(tmp_path):
    d = load_cifar("synthetic", tmp_path, device="cpu")
    folder = tmp_path / "synthetic" / "cifar-100-python"
    assert d.folder == folder and (len(d.train), len(d.val), len(d.test)) == (3600, 400, 1000)
    assert torch.equal(torch.bincount(d.test.labels), torch.full((100,), 10))
    stamp = os.stat(folder / "train").st_mtime_ns
    assert_same(load_cifar("synthetic", tmp_path, device="cpu"), d)
    assert os.stat(folder / "train").st_mtime_ns == stamp


def test_synthetic_classes_are_learnable_but_no_pixel_gives_them_away(tmp_path):
    torch.manual_seed(0)
    d = load_cifar("synthetic", tmp_path, device="cpu")
    x, y = d.train.images.float().flatten(1), d.train.labels
    xv, yv = d.val.images.float().flatten(1), d.val.labels
    means = torch.zeros(100, x.shape[1]).index_add_(0, y, x) / torch.bincount(y)[:, None]
    per_pixel = ((xv[:, None, :] - means).abs().argmin(1) == yv[:, None]).float().mean(0)
    assert per_pixel.max() < 0.10  # the best single pixel-channel, nearest class mean

    net = torch.nn.Sequential(  # small: 2 epochs reach about 17% here (23% at twice the width, twice the time)
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 100))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for epoch in range(2):
        for xb, yb in Batches(d.train, 64, shuffle=True, drop_last=True).epoch(epoch):
            loss = torch.nn.functional.cross_entropy(net(xb.float() / 255 - 0.5), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(d.val.images.float() / 255 - 0.5).argmax(1) == d.val.labels).float().mean()
    assert acc > 0.10  # chance is 0.01


def test_checksum_mismatch_names_the_file(cifar100_dir):
    with pytest.raises(UserError, match=r"checksum mismatch for .*cifar-100-python/train.*verify_checksums=False"):
        load_cifar("cifar100", cifar100_dir, verify_checksums=True, download=False, device="cpu")


def test_incomplete_folder_is_a_clear_error(tmp_path, cifar100_dir):
    shutil.copytree(cifar100_dir / "cifar-100-python", tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(UserError, match=r"incomplete: test missing"):
        load_cifar("cifar100", tmp_path, **LOAD)


def test_tarball_is_extracted_and_loads_the_same(tmp_path, cifar100_dir, cifar100_tarball):
    shutil.copy(cifar100_tarball, tmp_path)
    d = load_cifar("cifar100", tmp_path, **LOAD)
    assert d.folder == tmp_path / "cifar-100-python" and d.folder.is_dir()
    assert_same(d, load_cifar("cifar100", cifar100_dir, **LOAD))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]


def test_tarball_checksum_mismatch_extracts_nothing(tmp_path, cifar100_tarball):
    shutil.copy(cifar100_tarball, tmp_path)
    with pytest.raises(UserError, match=r"checksum mismatch for .*cifar-100-python.tar.gz"):
        load_cifar("cifar100", tmp_path, verify_checksums=True, download=False, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python.tar.gz"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_cifar"])
def test_corrupt_tarball_names_the_file_and_leaves_nothing_behind(tmp_path, cifar100_tarball, damage):
    bad = tmp_path / "cifar-100-python.tar.gz"
    if damage == "truncated":
        bad.write_bytes(cifar100_tarball.read_bytes()[: cifar100_tarball.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(b"this is not a tarball" * 100)
    else:
        (tmp_path / "x").write_text("hello")
        with tarfile.open(bad, "w:gz") as tf:
            tf.add(tmp_path / "x", arcname="cifar-100-python/x")
        (tmp_path / "x").unlink()
    with pytest.raises(UserError, match=str(bad)):
        load_cifar("cifar100", tmp_path, **LOAD)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python.tar.gz"]
    # the next attempt meets the same clear error, not a half-extracted folder
    with pytest.raises(UserError, match=str(bad)):
        load_cifar("cifar100", tmp_path, **LOAD)


def test_full_disk_during_extraction_keeps_nothing(tmp_path, cifar100_tarball, monkeypatch):
    shutil.copy(cifar100_tarball, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(UserError, match="no space left"):
        load_cifar("cifar100", tmp_path, **LOAD)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python.tar.gz"]


def test_missing_data_error_says_where_it_looked_and_how_to_fix_it(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar("cifar100", tmp_path, download=False, device="cpu")
    msg = str(e.value)
    assert "download=False" in msg
    assert f"{tmp_path}/cifar-100-python/" in msg and f"{tmp_path}/cifar-100-python.tar.gz" in msg
    assert all(f"  {i}. " in msg for i in (1, 2, 3))


def test_failed_download_gives_up_quickly_and_keeps_nothing(tmp_path, monkeypatch):
    # `.invalid` never resolves (RFC 2606), with or without a network
    bad = sources.Source(**{**sources.SOURCES["cifar100"].__dict__, "url": "https://cifarlib-test.invalid/c.tar.gz"})
    monkeypatch.setitem(sources.SOURCES, "cifar100", bad)
    with pytest.raises(UserError, match=r"cifarlib-test.invalid.*\n.*Looked for") as e:
        load_cifar("cifar100", tmp_path, device="cpu")
    assert "3. allow the download" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_hanging_name_lookup_is_cut_short(monkeypatch):
    monkeypatch.setattr(sources.socket, "getaddrinfo", lambda *a: time.sleep(3))
    start = time.monotonic()
    reason = sources.unreachable("example.org", timeout=0.2)
    assert "took over 0.2 s" in reason and time.monotonic() - start < 2


def test_cli_reports_one_message_and_exits_non_zero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cifarlib.data", "--data-dir", str(tmp_path), "--no-download"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("python -m cifarlib.data: error: CIFAR-100 was not found")
    assert "Traceback" not in r.stderr


def test_pickles_that_would_run_code_are_refused(tmp_path, cifar100_dir):
    shutil.copytree(cifar100_dir / "cifar-100-python", tmp_path / "cifar-100-python")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        load_cifar("cifar100", tmp_path, **LOAD)


def test_bad_arguments_are_clear_errors(cifar100_dir):
    with pytest.raises(UserError, match="unknown dataset 'cifar1000'"):
        load_cifar("cifar1000", cifar100_dir, **LOAD)
    with pytest.raises(UserError, match="val_fraction"):
        load_cifar("cifar100", cifar100_dir, val_fraction=1.5, **LOAD)
    with pytest.raises(UserError, match="max_train_samples"):
        load_cifar("cifar100", cifar100_dir, max_train_samples=0, **LOAD)


def ids_split(per_class: int, classes: int = 100) -> Split:
    """A split whose 'image' is its own index, so samples can be traced through splits."""
    labels = torch.arange(classes).repeat(per_class)
    return Split(torch.arange(len(labels)), labels)


def test_default_split_is_45000_5000_stratified_and_disjoint():
    full = ids_split(500)
    train, val = split_train_val(full, 0.1, seed=0)
    assert (len(train), len(val)) == (45000, 5000)
    assert torch.equal(torch.bincount(val.labels), torch.full((100,), 50))
    assert torch.equal(torch.cat([train.images, val.images]).sort().values, torch.arange(50000))


def test_split_is_deterministic_and_seeded():
    full = ids_split(50)
    a, b = split_train_val(full, 0.2, seed=1), split_train_val(full, 0.2, seed=1)
    c = split_train_val(full, 0.2, seed=2)
    assert torch.equal(a[1].images, b[1].images) and not torch.equal(a[1].images, c[1].images)
    assert torch.equal(torch.bincount(a[1].labels), torch.full((100,), 10))


def test_validation_comes_from_unaugmented_training_images(cifar100_dir):
    d = load_cifar("cifar100", cifar100_dir, **LOAD)
    raw = load_cifar("cifar100", cifar100_dir, val_fraction=0, **LOAD).train
    # every validation image is, byte for byte, an official training image
    flat = {bytes(img.flatten().tolist()) for img in raw.images}
    assert all(bytes(img.flatten().tolist()) in flat for img in d.val.images)


def test_uneven_classes_keep_their_proportions():
    labels = torch.cat([torch.zeros(90), torch.ones(10)]).long()
    idx = stratified_pick(labels, 20, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(labels[idx]), torch.tensor([18, 2]))
    assert len(set(idx.tolist())) == 20


def test_caps_are_stratified_or_random_below_the_class_count(cifar100_dir):
    d = load_cifar("cifar100", cifar100_dir, max_train_samples=200, max_eval_samples=100, **LOAD)
    assert len(d.train) == 200 and torch.equal(torch.bincount(d.train.labels), torch.full((100,), 2))
    assert len(d.val) == 100 and len(d.test) == 100
    assert torch.equal(torch.bincount(d.test.labels), torch.ones(100, dtype=torch.int64))
    small = load_cifar("cifar100", cifar100_dir, max_train_samples=30, max_eval_samples=7, **LOAD)
    assert len(small.train) == 30 and len(small.val) == 7 and len(small.test) == 7
    again = load_cifar("cifar100", cifar100_dir, max_train_samples=30, max_eval_samples=7, **LOAD)
    assert_same(small, again)
    # the cap does not move the validation split
    assert torch.equal(load_cifar("cifar100", cifar100_dir, max_train_samples=200, **LOAD).val.images,
                       load_cifar("cifar100", cifar100_dir, **LOAD).val.images)


def test_batches_visit_each_sample_once_per_epoch_and_reshuffle():
    split = ids_split(10)  # 1000 samples
    loader = Batches(split, 64, shuffle=True, seed=3)
    epochs = [torch.cat([x for x, _ in loader.epoch(e)]) for e in range(3)]
    assert len(loader) == 16
    for order in epochs:
        assert torch.equal(order.sort().values, torch.arange(1000))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert torch.equal(torch.cat([x for x, _ in loader.epoch(1)]), epochs[1])  # replayable
    for x, y in loader.epoch(0):
        assert torch.equal(split.labels[x], y)  # labels travel with their images


def test_drop_last_gives_even_full_batches_and_tiny_splits_still_one_batch():
    loader = Batches(ids_split(10), 64, shuffle=True, drop_last=True)
    sizes = [len(x) for x, _ in loader.epoch(0)]
    assert sizes == [64] * 15 == [64] * len(loader)
    tiny = Batches(ids_split(2), 256, shuffle=True, drop_last=True)  # 200 samples
    assert [len(x) for x, _ in tiny.epoch(0)] == [200] and len(tiny) == 1
    plain = Batches(ids_split(10), 64)
    assert torch.equal(torch.cat([x for x, _ in plain]), torch.arange(1000))
    shuffled = Batches(ids_split(10), 64, shuffle=True)
    first, second = (torch.cat([x for x, _ in shuffled]) for _ in range(2))  # iter() moves on an epoch
    assert torch.equal(first, torch.cat([x for x, _ in shuffled.epoch(0)])) and not torch.equal(first, second)


def test_data_and_batches_stay_on_the_device_asked_for(cifar100_dir):
    d = load_cifar("cifar100", cifar100_dir, device="auto", verify_checksums=False, download=False)
    device = runtime.pick_device("auto")
    assert d.train.images.device.type == device.type
    x, y = next(iter(Batches(d.train, 32, shuffle=True).epoch(0)))
    assert x.device.type == y.device.type == device.type


def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = runtime.project_root()
    assert (root / "pyproject.toml").is_file() and (root / "cifarlib").is_dir()
    assert runtime.resolve_path("data") == root / "data"
    assert runtime.resolve_path(tmp_path / "x") == tmp_path / "x"


def test_paths_in_messages_read_plainly(tmp_path):
    """`..` is resolved: a message names `/work/shared/x`, not `/work/main/../shared/x`."""
    root = runtime.project_root()
    assert runtime.resolve_path("../shared/real/x.tar.gz") == root.parent / "shared" / "real" / "x.tar.gz"
    assert ".." not in str(runtime.resolve_path(tmp_path / "a" / ".." / "b")) and str(runtime.resolve_path("data/./x")).endswith("data/x")
    with pytest.raises(UserError, match=rf"data_dir {root.parent / 'nowhere'} does not exist"):
        load_cifar("folder", "../nowhere", device="cpu")
