"""Pictures off the device (issue 30): on the host or on disk, the same batches and the same history;
the quasi-random block order; the raw image cache, built in one streaming pass."""

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from interrupted import stopped_at_batch
from PIL import Image

from cifarlib.core import placement, runtime
from cifarlib.core.errors import UserError
from cifarlib.data import imagecache, mapped
from cifarlib.data.datasets import Batches, block_order, load_cifar
from cifarlib.data.splits import Split
from cifarlib.data.synthetic import make_images
from cifarlib.model import build_model, inference
from cifarlib.training import train
from cifarlib.training.config import make_config

CLASSES = ("cat", "dog", "frog")
TINY = dict(preset="cpu", dataset="folder", weights="none", backbone="test_resnet", image_size=32, store_size=32,
            batch_size=8, epochs=2, device="cpu", lr_scale=0.01, val_fraction=0.2, check_every=1)
TIMED = ("seconds", "images_per_s")
pytestmark = pytest.mark.usefixtures("one_thread")  # runs compared with one another: the same arithmetic


def make_folder(root: Path, per_class: int = 20) -> Path:
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    for i, (img, label) in enumerate(zip(make_images(labels * 7, seed=1), labels.tolist())):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / CLASSES[label] / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("stream") / "photos")


def config(folder: Path, name: str, **kw):
    return make_config(**{**TINY, "data_dir": str(folder), "cache_dir": str(folder.parent / "cache"),
                          "checkpoint_dir": str(folder.parent / "ckpt"), "run_name": name, **kw})


def history(run_dir: Path) -> list[dict]:
    import csv
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMED} for row in csv.DictReader(f)]


def whole(cfg) -> Path:
    run = train.prepare(cfg)
    list(train.epochs(run))
    return run.dir


def stopped_and_resumed(cfg) -> Path:
    """The run stopped by SIGTERM in the middle of its second epoch (batch 3), then resumed."""
    stopped_at_batch(cfg, 6 + 3)  # 48 training pictures, 6 batches an epoch
    return whole(make_config(**{**TINY, "run_name": cfg.run_name, "checkpoint_dir": cfg.checkpoint_dir,
                                "data_dir": cfg.data_dir, "cache_dir": cfg.cache_dir, "resume": True}))


@pytest.fixture(scope="module")
def on_device(folder):
    return whole(config(folder, "device", data_on="device"))


@pytest.mark.parametrize("data_on", ["host", "disk"])
def test_pictures_on_the_host_or_disk_give_the_devices_history_through_a_sigterm_and_resume(folder, on_device, data_on):
    run_dir = stopped_and_resumed(config(folder, f"stopped-{data_on}", data_on=data_on))
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    assert plan["data_on"] == data_on and plan["order"] == "shuffle"
    assert len(history(on_device)) == 2 and history(run_dir) == history(on_device)


def test_a_folder_over_half_of_free_memory_trains_from_disk_with_auto_and_the_same_history(folder, on_device,
                                                                                         monkeypatch, capsys):
    need = 60 * 3 * 32 * 32  # every picture (48 training, 12 validation) at 32 px
    monkeypatch.setattr(runtime, "available_memory", lambda device: need * 3 // 2)  # the figure the test sets
    with pytest.raises(UserError, match="more than half of the 0.0 GB free on cpu.*data_on=auto or disk"):
        train.prepare(config(folder, "refused", data_on="device"))
    run_dir = whole(config(folder, "auto"))
    assert "training pictures on the disk (the memory-mapped image cache)" in capsys.readouterr().out
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    assert plan["data_on"] == "disk" and "over half of the 0.0 GB free in memory" in plan["data_why"]
    assert plan["order"] == "shuffle"  # the page cache holds the pictures: random reads are cheap
    assert history(run_dir) == history(on_device)
    monkeypatch.setattr(runtime, "available_memory", lambda device: need // 2)  # a cache bigger than memory
    assert placement.resolve_order("auto", "disk", need) == "block" and placement.resolve_order("auto", "host", need) == "shuffle"
    assert placement.resolve_order("shuffle", "disk", need) == "shuffle"


def test_the_block_order_is_seeded_and_exact_on_resume(folder):
    stopped = stopped_and_resumed(config(folder, "block-stopped", data_on="disk", order="block"))
    assert history(stopped) == history(whole(config(folder, "block-whole", data_on="disk", order="block")))


def test_block_order_shuffles_blocks_then_pictures_within_windows_of_blocks():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    order = block_order(103, 4, 3, g(0))
    assert sorted(order.tolist()) == list(range(103))  # each picture once
    assert torch.equal(order, block_order(103, 4, 3, g(0))) and not torch.equal(order, block_order(103, 4, 3, g(1)))
    blocks = block_order(96, 4, 3, g(0)) // 4
    for start in range(0, 96, 12):  # a window: the pictures of 3 blocks, all of them
        window = blocks[start:start + 12]
        assert len(set(window.tolist())) <= 3 and all((blocks == b).sum() == (window == b).sum() for b in window)
    assert not torch.equal(order[:12].sort().values, order[:12])  # shuffled within the window
    split = Split(torch.zeros(50, 3, 2, 2, dtype=torch.uint8), torch.zeros(50, dtype=torch.int64))
    assert not torch.equal(Batches(split, 5, shuffle=True, block=True).order(0),
                           Batches(split, 5, shuffle=True, block=True).order(1))


def test_gathered_batches_are_the_sliced_ones_and_the_thread_stops_and_reports(monkeypatch):
    images = torch.randint(0, 256, (37, 3, 4, 4), dtype=torch.uint8)
    split = Split(images, torch.arange(37))
    sliced = list(Batches(split, 5, shuffle=True, seed=3).epoch(2))
    for ahead in (0, 2):
        got = list(Batches(split, 5, shuffle=True, seed=3, ahead=ahead).epoch(2))
        assert len(got) == len(sliced) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                 for a, b in zip(got, sliced))
    before = threading.active_count()
    batches = Batches(split, 5, ahead=2).epoch(0)
    next(batches)
    batches.close()  # a run that stops mid-epoch
    for t in threading.enumerate():
        if t.name == "gather":
            t.join(5)
    assert threading.active_count() == before

    def broken(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(runtime, "host_empty", broken)
    with pytest.raises(OSError, match="Input/output"):
        list(Batches(split, 5, ahead=2).epoch(0))


def test_a_split_on_disk_stays_mapped_when_sharded_and_predicts_as_on_the_device(folder):
    on_disk = load_cifar("folder", folder, cache_dir=folder.parent / "cache", device="cpu", data_on="disk")
    in_memory = load_cifar("folder", folder, cache_dir=folder.parent / "cache", device="cpu", data_on="device")
    assert on_disk.data_on == "disk" and mapped.is_mapped(on_disk.train.images)
    assert not mapped.is_mapped(in_memory.train.images)
    shard = on_disk.train.every(1, 48, 2)
    assert mapped.is_mapped(shard.images) and torch.equal(shard.images, in_memory.train.images[1:48:2])
    for order in (False, True):  # read from the file (one picture a call at a stride), as sliced in memory
        read = Batches(shard, 5, shuffle=True, block=order, ahead=2).epoch(1)
        sliced = Batches(in_memory.train.every(1, 48, 2), 5, shuffle=True, block=order).epoch(1)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(read, sliced))
    model = build_model("test_resnet", 3, "none").eval()
    args = (32, (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(inference.predict_split(model, on_disk.val, *args),
                       inference.predict_split(model, in_memory.val, *args))


def test_a_cache_too_big_for_the_disk_is_refused_before_decoding_unless_memory_holds_it(tmp_path, monkeypatch, capfd):
    root = make_folder(tmp_path / "p", per_class=4)
    decoded = []
    real = imagecache.decode
    monkeypatch.setattr(imagecache, "decode", lambda files, size, **kw: decoded.append(len(files)) or real(files, size, **kw))
    monkeypatch.setattr(imagecache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match=r"needs 0\.00 GB on disk at .*image-cache, which has 0\.00 GB free"):
        load_cifar("folder", root, cache_dir=tmp_path / "c", device="cpu", data_on="disk")
    assert decoded == []
    d = load_cifar("folder", root, cache_dir=tmp_path / "c", device="cpu")  # auto: memory holds it
    assert len(d.train) + len(d.val) == 12 and "decoded into memory" in capfd.readouterr().err
    monkeypatch.undo()  # room on the disk, but a write that fails: pictures meant to stay on disk are refused

    def full(path, data, full_disk_fix=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(imagecache, "write_atomically", full)
    with pytest.raises(UserError, match="could not write the image cache .*No space left on device"):
        load_cifar("folder", root, cache_dir=tmp_path / "c2", device="cpu", data_on="disk")


def test_an_old_torch_save_cache_is_rebuilt_once_from_its_own_images(tmp_path, monkeypatch, capfd):
    root = make_folder(tmp_path / "p", per_class=4)
    first = load_cifar("folder", root, cache_dir=tmp_path / "c", device="cpu")
    (new,) = (tmp_path / "c" / "image-cache").glob("*.u8")
    c = imagecache._read(new, 32)
    torch.save({"version": 1, "store_size": 32, "paths": "\0".join(c.paths), "sizes": torch.tensor(c.sizes),
                "mtimes": torch.tensor(c.mtimes), "rows": torch.tensor(c.rows), "reasons": "\0".join(c.reasons),
                "images": c.images.clone()}, new.with_suffix(".pt"))  # the format before the raw file
    new.unlink()
    monkeypatch.setattr(imagecache, "decode", lambda *a, **k: pytest.fail("decoded again"))
    capfd.readouterr()
    again = load_cifar("folder", root, cache_dir=tmp_path / "c", device="cpu")
    assert "rebuilding it once from its own images" in capfd.readouterr().err
    assert torch.equal(again.train.images, first.train.images) and new.is_file() and not new.with_suffix(".pt").exists()


FIRST_LOAD = """
import json, sys
from pathlib import Path
import psutil
from cifarlib.data import imagecache, mapped
from cifarlib.data.datasets import load_cifar
imagecache.CHUNK_BYTES = 8 << 20
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
base = psutil.Process().memory_info().rss
d = load_cifar("folder", root, cache_dir=cache, store_size=512, val_fraction=0.25, device="cpu", data_on="disk")
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"above": peak - base, "final": sum(s.images.nbytes for s in (d.train, d.val, d.test)),
                  "mapped": mapped.is_mapped(d.train.images)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory from /proc")
def test_a_first_load_to_disk_holds_a_chunk_not_the_pictures(tmp_path):
    """213 MB of pictures at 512 px (from 4x4 PNGs, fast to decode), built into the cache in
    8 MB chunks and left there: the peak above the baseline is a few chunks, not the pictures."""
    pytest.importorskip("psutil")
    for name in ("a", "b"):
        (tmp_path / "p" / name).mkdir(parents=True)
        for i in range(136):
            Image.new("RGB", (4, 4), (i, 40, 90)).save(tmp_path / "p" / name / f"{i:03d}.png")
    cache = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else tmp_path, prefix="cifarlib-test-"))
    try:
        got = subprocess.run([sys.executable, "-c", FIRST_LOAD, str(tmp_path / "p"), str(cache)], capture_output=True,
                             text=True, timeout=300, check=True)
    finally:
        import shutil
        shutil.rmtree(cache)
    m = json.loads(got.stdout)
    assert m["mapped"] and m["final"] == 272 * 3 * 512 * 512
    assert m["above"] <= 0.35 * m["final"], f"peak {m['above'] / 1e6:.0f} MB above the baseline"


def test_data_on_is_checked_and_cifar_has_no_disk(tmp_path):
    with pytest.raises(UserError, match="data_on must be one of"):
        make_config("cpu", data_on="ssd")
    with pytest.raises(UserError, match="order must be one of"):
        make_config("cpu", order="random")
    with pytest.raises(UserError, match="data_on=disk reads the image cache of dataset=folder"):
        load_cifar("synthetic", tmp_path, device="cpu", data_on="disk")
    host = load_cifar("synthetic", tmp_path, device="cpu", data_on="host", max_train_samples=10, max_eval_samples=5)
    assert host.data_on == "host" and len(host.train) == 10


def test_notebook_01s_figures_and_04s_evaluation_are_the_same_with_the_pictures_on_disk(folder, on_device, monkeypatch):
    from cifarlib.evaluation import evaluate, plots
    kw = dict(cache_dir=folder.parent / "cache", device="cpu")
    in_memory, on_disk = (load_cifar("folder", folder, data_on=where, **kw) for where in ("device", "disk"))
    assert on_disk.data_on == "disk" and plots.channel_stats(on_disk).equals(plots.channel_stats(in_memory))
    assert plots.similar_class_pairs(on_disk) == plots.similar_class_pairs(in_memory)
    expected = evaluate.evaluate_checkpoint(on_device / "best.pt", split="val", device="cpu").metrics
    monkeypatch.setattr(runtime, "available_memory", lambda device: 1000)  # the pictures go to disk
    got = evaluate.evaluate_checkpoint(on_device / "best.pt", split="val", device="cpu")
    assert mapped.is_mapped(got.split.images)
    assert {k: v for k, v in got.metrics.items() if k != "date"} == {k: v for k, v in expected.items() if k != "date"}


def test_the_budgets_probe_times_a_run_whose_pictures_are_on_disk(folder):
    from cifarlib.training import trial
    run = train.prepare(config(folder, "probe", data_on="disk", order="block"), folder=False)
    assert run.plan.data_on == "disk" and mapped.is_mapped(run.train.images)
    costs = trial.probe(run, steps=2, warmup=1)
    assert len(costs) == len(run.cfg.stages) and all(c.step_s > 0 and c.val_s > 0 for c in costs)


def test_a_cache_rebuilt_under_a_mapped_split_leaves_it_its_pictures_and_a_crafted_trailer_is_rebuilt(tmp_path, capfd):
    root = make_folder(tmp_path / "p", per_class=4)
    kw = dict(cache_dir=tmp_path / "c", device="cpu", data_on="disk")
    first = load_cifar("folder", root, **kw)
    expected = first.train.images.clone()
    other = load_cifar("folder", root, max_train_samples=3, **kw)  # another pick: the file is laid out again
    assert len(other.train) == 3
    batches = list(Batches(first.train, 4, ahead=2).epoch(0))  # read with the descriptor of the file it mapped
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    (path,) = (tmp_path / "c" / "image-cache").glob("*.u8")
    raw = path.read_bytes()
    length = int.from_bytes(raw[-24:-16], "little")
    trailer = json.loads(raw[-24 - length:-24])
    trailer["rows"] = [float(r) for r in trailer["rows"]]  # rows that are not whole numbers
    crafted = json.dumps(trailer).encode()
    path.write_bytes(raw[:-24 - length] + crafted + len(crafted).to_bytes(8, "little") + imagecache.MAGIC)
    capfd.readouterr()
    again = load_cifar("folder", root, **kw)
    assert "is damaged" in capfd.readouterr().err and torch.equal(again.train.images, expected)
