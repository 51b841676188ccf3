"""Your own pictures as a dataset: layouts, archives, the decode cache, errors, and downstream use."""

import io
import json
import re
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlib.core.errors import UserError
from cifarlib.data import folders, imagecache
from cifarlib.data.__main__ import main as data_main
from cifarlib.data.datasets import load_cifar
from cifarlib.data.synthetic import make_images
from cifarlib.model import GROUPS, inference
from cifarlib.training import train
from cifarlib.training.config import Stage, make_config
from cifarlib.evaluation import evaluate
from cifarlib.serving.predict import Predictor

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "cifar10-train-jpeg.tar.gz"
RED, BLUE = (200, 30, 30), (30, 40, 200)


def save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)


def make_folder(root: Path, classes=("cat", "dog", "frog"), per_class: int = 6, size=(48, 40)) -> Path:
    """JPEGs of synthetic CIFAR-like classes (learnable shapes), `per_class` per class folder."""
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    for img, label, i in zip(make_images(labels * 7, seed=1), labels.tolist(), range(len(labels))):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(size)
        save(pil, root / classes[label] / f"{i:03d}.jpg", "JPEG")
    return root


def load(path, cache, **kw):
    return load_cifar("folder", path, cache_dir=cache, device="cpu", **kw)


@pytest.fixture
def mixed(tmp_path):
    """train/cat holds every kind of file a user's folder may hold; train/dog plain JPEGs."""
    root = tmp_path / "photos"
    cat = root / "train" / "cat"
    red = Image.new("RGB", (60, 40), RED)
    save(red, cat / "a.jpg", "JPEG")
    save(red, cat / "b.png", "PNG")
    save(red.quantize(8), cat / "c_palette.png", "PNG")
    save(red.convert("CMYK"), cat / "d_cmyk.jpg", "JPEG")
    save(red, cat / "holiday" / "e.jpg", "JPEG")  # a sub-folder: tried too
    good = io.BytesIO()
    red.save(good, "JPEG")
    (cat / "broken.jpg").write_bytes(good.getvalue()[:200])  # truncated
    (cat / "notes.txt").write_text("not a picture")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for i in range(5):
        save(Image.new("RGB", (30, 50), BLUE), root / "train" / "dog" / f"{i}.jpg", "JPEG")
    return root


def test_a_folder_of_mixed_files_loads_decodes_and_skips_what_it_must(mixed, tmp_path, capfd):
    d = load(mixed, tmp_path / "cache", store_size=8, val_fraction=0.2)
    assert d.name == "folder" and d.classes == ["cat", "dog"] and d.superclasses is None
    assert len(d.train) + len(d.val) == 5 + 5 and len(d.test) == 0
    assert d.train.images.shape[1:] == (3, 8, 8) and d.train.images.dtype == torch.uint8
    images = torch.cat([d.train.images, d.val.images]).float()
    labels = torch.cat([d.train.labels, d.val.labels])
    # JPEG, PNG, palette PNG, CMYK JPEG and the sub-folder's file: all red, none inverted
    assert (images[labels == 0] - torch.tensor(RED).view(1, 3, 1, 1)).abs().amax() < 16
    assert (images[labels == 1] - torch.tensor(BLUE).view(1, 3, 1, 1)).abs().amax() < 16
    assert sorted(s.split(":")[0] for s in d.skipped) == ["train/cat/broken.jpg", "train/cat/notes.txt"]
    err = capfd.readouterr().err
    assert "2 of the 12 picked files are not usable images and are skipped: train/cat/broken.jpg, " \
           "train/cat/notes.txt (the full list, with reasons: " in err and ".DS_Store" not in err
    listed = next((tmp_path / "cache" / "image-cache").glob("*.skipped.txt")).read_text()
    assert "train/cat/broken.jpg\t" in listed and "train/cat/notes.txt\t" in listed and "DS_Store" not in listed


def test_validation_and_test_folders_are_used_as_they_are(tmp_path):
    make_folder(tmp_path / "p" / "train", per_class=4)
    make_folder(tmp_path / "p" / "valid", per_class=2)
    make_folder(tmp_path / "p" / "test", per_class=3)
    d = load(tmp_path / "p", tmp_path / "cache")
    assert (len(d.train), len(d.val), len(d.test)) == (12, 6, 9)
    assert torch.equal(torch.bincount(d.val.labels), torch.tensor([2, 2, 2]))
    capped = load(tmp_path / "p", tmp_path / "cache", max_train_samples=6, max_eval_samples=3)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (6, 3, 3)
    assert torch.equal(torch.bincount(capped.train.labels), torch.tensor([2, 2, 2]))


def test_without_a_validation_folder_validation_is_a_stratified_seeded_share_of_train(tmp_path):
    make_folder(tmp_path / "p", per_class=10)  # <class>/* alone: the training split
    a = load(tmp_path / "p", tmp_path / "cache", val_fraction=0.2, seed=3)
    b = load(tmp_path / "p", tmp_path / "cache", val_fraction=0.2, seed=3)
    assert (len(a.train), len(a.val)) == (24, 6) and torch.equal(torch.bincount(a.val.labels), torch.tensor([2, 2, 2]))
    assert torch.equal(a.val.images, b.val.images)
    train_rows = {bytes(x.flatten().tolist()) for x in a.train.images}
    assert not any(bytes(x.flatten().tolist()) in train_rows for x in a.val.images)  # disjoint


FIRST_LOAD = """
import json, resource, sys
from pathlib import Path
import psutil, torch
from cifarlib.data.datasets import load_cifar
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
base = psutil.Process().memory_info().rss
d = load_cifar("folder", root, cache_dir=cache, store_size=512, val_fraction=0.25, device="cpu")
try:  # this process's own peak: ru_maxrss may keep a larger parent's size across fork and exec
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
images = torch.cat([d.train.images, d.val.images])
labels = torch.cat([d.train.labels, d.val.labels])
green = images[:, 1, 256, 256].tolist()
print(json.dumps({"above": peak - base, "final": sum(s.images.nbytes for s in (d.train, d.val, d.test)),
                  "n": len(labels), "right": all(g == (40, 200)[y] for g, y in zip(green, labels.tolist()))}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="peak memory from getrusage")
def test_a_first_load_holds_about_one_copy_of_the_images_at_its_peak(tmp_path):
    """Decoded, cached and handed out: 271 images of 786 kB (213 MB) at 512 px, from 4x4 PNGs
    (fast to decode), with a broken file among them. Measured in a process of its own: the peak
    resident memory above the baseline, which tracemalloc would not see (torch's tensors)."""
    psutil = pytest.importorskip("psutil", reason="the memory test needs psutil")
    del psutil
    for name, green in (("a", 40), ("b", 200)):
        (tmp_path / "p" / name).mkdir(parents=True)
        for i in range(136):
            Image.new("RGB", (4, 4), (i, green, 90)).save(tmp_path / "p" / name / f"{i:03d}.png")
    (tmp_path / "p" / "a" / "050.png").write_bytes(b"not a picture")  # its row is moved over, in place
    cache = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path  # 213 MB written: to memory where it can
    cache = Path(tempfile.mkdtemp(dir=cache, prefix="cifarlib-test-"))
    try:
        got = subprocess.run([sys.executable, "-c", FIRST_LOAD, str(tmp_path / "p"), str(cache)], capture_output=True,
                             text=True, timeout=300, check=True)
    finally:
        shutil.rmtree(cache)
    m = json.loads(got.stdout)
    assert m["n"] == 271 and m["right"] and m["final"] == 271 * 3 * 512 * 512
    assert m["above"] <= 1.5 * m["final"], f"peak {m['above'] / m['final']:.2f}x the images"


def test_only_the_picked_files_are_decoded_and_the_cache_is_reused_or_updated(tmp_path, monkeypatch):
    make_folder(tmp_path / "p", per_class=10)
    decoded = []
    real = imagecache.decode
    monkeypatch.setattr(imagecache, "decode", lambda files, size, **kw: decoded.append(len(files)) or real(files, size, **kw))
    cache = tmp_path / "cache"
    small = load(tmp_path / "p", cache, max_train_samples=6, max_eval_samples=3)
    assert decoded == [9]  # 6 training and 3 validation files, nothing else
    full = load(tmp_path / "p", cache)
    assert decoded == [9, 21]  # the 9 come from the cache
    again = load(tmp_path / "p", cache)
    assert decoded == [9, 21]  # nothing changed: nothing decoded
    for name in ("train", "val"):
        assert torch.equal(getattr(full, name).images, getattr(again, name).images)
    assert torch.equal(load(tmp_path / "p", cache, max_train_samples=6, max_eval_samples=3).train.images, small.train.images)
    # a file rewritten: only it is decoded again, and its new content is what loads
    victim = sorted((tmp_path / "p" / "dog").iterdir())[0]
    save(Image.new("RGB", (40, 40), BLUE), victim, "JPEG")
    changed = load(tmp_path / "p", cache)
    assert decoded == [9, 21, 1]
    together = torch.cat([changed.train.images, changed.val.images]).float()
    assert ((together - torch.tensor(BLUE).view(1, 3, 1, 1)).abs().amax((1, 2, 3)) < 16).sum() == 1
    # another store_size is another cache
    assert load(tmp_path / "p", cache, store_size=16).train.images.shape[-1] == 16 and decoded[-1] == 30


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other version", "parts disagree"])
def test_a_damaged_or_foreign_cache_is_rebuilt_with_a_notice(tmp_path, capfd, damage):
    make_folder(tmp_path / "p", per_class=3)
    first = load(tmp_path / "p", tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "image-cache").glob("*.u8")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"no cache at all")
    else:
        raw = path.read_bytes()
        length = int.from_bytes(raw[-24:-16], "little")
        images, c = raw[:-24 - length], json.loads(raw[-24 - length:-24])
        if damage == "other version":
            c["version"] = 1
        else:
            c["rows"] = [0] * len(c["rows"])  # every file pointing at the first image
        trailer = json.dumps(c).encode()
        path.write_bytes(images + trailer + len(trailer).to_bytes(8, "little") + imagecache.MAGIC)
    capfd.readouterr()
    rebuilt = load(tmp_path / "p", tmp_path / "cache")
    err = capfd.readouterr().err
    assert ("another version" if damage == "other version" else "is damaged") in err and "rebuilding it" in err
    assert "decoded 9 files" in err
    assert torch.equal(rebuilt.train.images, first.train.images) and torch.equal(rebuilt.val.images, first.val.images)
    assert load(tmp_path / "p", tmp_path / "cache") is not None and "rebuilding" not in capfd.readouterr().err


def test_a_cache_that_cannot_be_written_costs_a_notice_not_the_data(tmp_path, capfd, monkeypatch):
    make_folder(tmp_path / "p", per_class=3)

    def full_disk(path, data, full_disk_fix=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(imagecache, "write_atomically", full_disk)
    d = load(tmp_path / "p", tmp_path / "cache")
    assert len(d.train) + len(d.val) == 9
    assert "could not write the image cache" in capfd.readouterr().err
    assert not list((tmp_path / "cache" / "image-cache").glob("*.u8"))


def test_a_disk_that_fills_up_while_the_cache_is_written_costs_a_notice_not_the_data(tmp_path, capfd, full_disk):
    make_folder(tmp_path / "p", per_class=3)
    full_disk(1000)  # torch.save then raises a RuntimeError chained on the OSError, not the OSError
    d = load(tmp_path / "p", tmp_path / "cache", store_size=64)
    assert len(d.train) + len(d.val) == 9
    assert "could not write the image cache" in capfd.readouterr().err
    assert not list((tmp_path / "cache" / "image-cache").iterdir())  # no temporary file left either


def test_links_that_loop_are_named_and_not_followed(tmp_path, capfd):
    root = make_folder(tmp_path / "p", per_class=2)
    (root / "cat" / "up").symlink_to("..")  # back to the top: each class again, and "up" again, forever
    (root / "dog" / "more").symlink_to(tmp_path / "elsewhere")  # a folder outside, which links back
    make_folder(tmp_path / "elsewhere", classes=("extra",), per_class=1)
    (tmp_path / "elsewhere" / "back").symlink_to(root / "dog")
    (root / "frog" / "me").symlink_to("me")  # a link to itself
    d = load(root, tmp_path / "cache", val_fraction=0)
    assert d.classes == ["cat", "dog", "frog"] and torch.equal(torch.bincount(d.train.labels), torch.tensor([2, 3, 2]))
    loops = [f"cat/up: a link to {root}, a folder it is itself in (a loop): not followed",
             f"dog/more/back: a link to {root / 'dog'}, a folder it is itself in (a loop): not followed"]
    assert set(loops) <= set(d.skipped) and "frog/me: unreadable (Too many levels of symbolic links)" in d.skipped
    assert f"file(s) or folder(s) are ignored: {loops[0]}" in capfd.readouterr().err


def pack(folder: Path, archive: Path, arcname: str) -> Path:
    if archive.suffix == ".zip":  # as macOS writes them, with a __MACOSX/ folder of ._ files beside
        with zipfile.ZipFile(archive, "w") as zf:
            for f in sorted(folder.rglob("*")):
                zf.write(f, f"{arcname}/{f.relative_to(folder)}")
                if f.is_file():
                    zf.writestr(f"__MACOSX/{arcname}/{f.parent.relative_to(folder)}/._{f.name}", b"\0\5\26\7")
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tf:
            tf.add(folder, arcname)
    return archive


@pytest.mark.parametrize("name", ["photos.tar.gz", "photos.zip", "photos.tar"])
def test_archives_are_extracted_once_into_cache_dir_and_unwrapped(tmp_path, name):
    make_folder(tmp_path / "src" / "train", per_class=3)
    make_folder(tmp_path / "src" / "test", per_class=2)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    archive = pack(tmp_path / "src", shelf / name, "outer/inner")  # two wrapping folders
    d = load(archive, tmp_path / "cache")
    assert d.classes == ["cat", "dog", "frog"] and len(d.test) == 6 and len(d.train) + len(d.val) == 9
    (extracted,) = (tmp_path / "cache" / "extracted").iterdir()
    assert d.folder == extracted / "outer" / "inner"
    assert [p.name for p in shelf.iterdir()] == [name]  # nothing beside the archive
    stamp = (extracted / folders.STAMP).stat().st_mtime_ns
    load(archive, tmp_path / "cache")
    assert (extracted / folders.STAMP).stat().st_mtime_ns == stamp  # extracted once
    pack(tmp_path / "src", archive, "outer/inner")  # the archive changes: extracted again
    os.utime(archive, ns=(1, 1))
    load(archive, tmp_path / "cache")
    assert (extracted / folders.STAMP).stat().st_mtime_ns != stamp


def test_split_and_class_folders_are_never_unwrapped(tmp_path):
    make_folder(tmp_path / "a" / "wrap" / "train", per_class=2)
    assert folders.unwrap(tmp_path / "a") == tmp_path / "a" / "wrap"  # train/ is kept
    make_folder(tmp_path / "b" / "wrap" / "more", classes=("cat",), per_class=2)
    assert folders.unwrap(tmp_path / "b") == tmp_path / "b" / "wrap" / "more"  # cat/ holds files: a class
    with pytest.raises(UserError, match=r"more has 1 class folder\(s\) \(cat\); a dataset needs at least two"):
        load(tmp_path / "b", tmp_path / "cache")


def test_a_corrupt_archive_is_named_and_leaves_nothing(tmp_path):
    make_folder(tmp_path / "src", per_class=2)
    archive = pack(tmp_path / "src", tmp_path / "photos.tar.gz", "photos")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{archive} is truncated, corrupt"):
        load(archive, tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def error_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """Each bad dataset: (data_dir, extra CLI arguments, the message's key words)."""
    none_usable = make_folder(tmp_path / "none_usable", per_class=2)
    for f in (none_usable / "dog").iterdir():
        f.write_bytes(b"not a jpeg")
    one_class = make_folder(tmp_path / "one_class", classes=("cat",), per_class=2)
    good = make_folder(tmp_path / "good", per_class=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_class").mkdir()
    make_folder(tmp_path / "empty_class", per_class=1)
    (tmp_path / "empty_class" / "zebra").mkdir()
    differ = make_folder(tmp_path / "differ" / "train", per_class=2).parent
    make_folder(differ / "val", classes=("cat", "dog", "fox"), per_class=1)
    two_vals = make_folder(tmp_path / "two_vals" / "train", per_class=2).parent
    make_folder(two_vals / "val", per_class=1)
    make_folder(two_vals / "validation", per_class=1)
    return {
        "no usable image": (none_usable, [], f"class folder {none_usable / 'dog'} has no usable image"),
        "empty class folder": (tmp_path / "empty_class", [], f"class folder {tmp_path / 'empty_class' / 'zebra'} has no usable image"),
        "one class": (one_class, [], f"{one_class} has 1 class folder(s) (cat); a dataset needs at least two"),
        "missing": (tmp_path / "nowhere", [], f"data_dir {tmp_path / 'nowhere'} does not exist"),
        "empty": (tmp_path / "empty", [], f"data_dir {tmp_path / 'empty'} is empty"),
        "classes differ": (differ, [], f"class folders of {differ / 'val'} differ from those of {differ / 'train'}: "
                                      "only in the training folder: frog; only in val/: fox"),
        "two validation folders": (two_vals, [], f"{two_vals} has 2 validation folders (val/, validation/)"),
        "too big": (good, ["--store-size", "200000"], "needs 720.00 GB on disk at"),
    }


def test_every_bad_dataset_is_one_line_from_the_cli_with_exit_2(tmp_path, capsys):
    for case, (path, extra, words) in error_cases(tmp_path).items():
        with pytest.raises(SystemExit) as e:
            data_main(["--dataset", "folder", "--data-dir", str(path), "--cache-dir", str(tmp_path / "c"), *extra])
        err = capsys.readouterr().err  # progress and notices may come first; the error is one line, last
        assert e.value.code == 2 and "Traceback" not in err, case
        assert err.endswith("\n") and err.count("error:") == 1, (case, err)
        last = err.splitlines()[-1]
        assert last.startswith("python -m cifarlib.data: error: ") and words in last, (case, err)
        if case == "too big":  # refused before decoding anything
            assert "max_train_samples" in last and "decoded" not in err


def test_the_cli_summarises_a_folder_and_fails_cleanly_in_a_real_process(mixed, tmp_path, capsys):
    data_main(["--dataset", "folder", "--data-dir", str(mixed), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "classes: cat, dog" in out and "skipped 2 file(s)" in out and "train/cat/notes.txt: not a usable image" in out
    assert re.search(r"  train +\d+ images\n  val +\d+ images\n  test +0 images", out)
    cmd = [sys.executable, "-m", "cifarlib.data", "--dataset", "folder", "--data-dir", str(tmp_path / "nowhere")]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def tiny_config(root: Path, data_dir, **kw):
    return make_config("cpu", dataset="folder", data_dir=str(data_dir), cache_dir=str(root / "cache"),
                       weights="none", backbone="resnet18", image_size=32, batch_size=8, epochs=1,
                       stages=(Stage("all", 1, GROUPS, (1e-3,) * len(GROUPS)),),
                       checkpoint_dir=str(root / "ckpt"), run_name="folder", device="cpu", **kw)


@pytest.fixture(scope="module")
def trained_on_folder(tmp_path_factory):
    """best.pt of one tiny epoch on a 3-class folder of 48x40 JPEGs, stored at 64 px."""
    root = tmp_path_factory.mktemp("folder_run")
    make_folder(root / "photos", per_class=8)
    run = train.prepare(tiny_config(root, root / "photos", store_size=64, val_fraction=0.25))
    assert run.data.train.images.shape[1:] == (3, 64, 64) and run.model.fc.out_features == 3
    for _ in train.epochs(run):
        pass
    return root, run.dir / "best.pt"


def test_a_folder_run_predicts_with_its_class_names_through_a_store_size_image(trained_on_folder, tmp_path, monkeypatch):
    root, best = trained_on_folder
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["store_size"] == 64 and ckpt["classes"] == ["cat", "dog", "frog"] and ckpt["dataset"] == "folder"
    p = Predictor.from_checkpoint(best, device="cpu")
    assert p.store_size == 64
    seen = []
    real = inference.evaluation_inputs  # the one evaluation path, which prediction takes
    monkeypatch.setattr(inference, "evaluation_inputs", lambda x, *a: seen.append(tuple(x.shape)) or real(x, *a))
    photo = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    top = p.predict(tmp_path / "photo.jpg", top_k=3).top
    assert seen == [(1, 3, 64, 64)]  # the 640x480 photo went in as a 64 px image
    assert sorted(name for name, _ in top) == ["cat", "dog", "frog"]


def test_old_checkpoints_without_store_size_predict_at_32(trained_on_folder, tmp_path):
    _, best = trained_on_folder
    ckpt = torch.load(best, weights_only=True)
    del ckpt["store_size"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert Predictor.from_checkpoint(tmp_path / "old.pt", device="cpu").store_size == 32


def test_evaluating_a_folder_run_uses_its_own_data_and_says_which_split(trained_on_folder):
    root, best = trained_on_folder
    with pytest.raises(UserError, match=r'no test/ folder, so there is no test split: .*split="val"'):
        evaluate.evaluate_checkpoint(best, split="test", device="cpu")
    ev = evaluate.evaluate_checkpoint(best, split="auto", device="cpu")  # data_dir from the checkpoint
    assert ev.metrics["split"] == "val" and ev.metrics["samples"] == 6 and ev.split.images.shape[1:] == (3, 64, 64)
    assert json.loads((best.parent / "metrics.json").read_text())["split"] == "val"


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def notebook_folder(tmp_path_factory):
    """train/ and val/ class folders, each listed class after class."""
    root = tmp_path_factory.mktemp("nb_folder")
    make_folder(root / "photos" / "train", per_class=4)
    make_folder(root / "photos" / "val", per_class=3)
    return {"dataset": "folder", "data_dir": str(root / "photos"), "cache_dir": str(root / "cache"), "store_size": 48}


def test_notebook_01_explores_a_folder(notebook_kernel, notebook_folder, tmp_path):
    text = notebook_kernel.run(NOTEBOOKS / "01_explore_data.ipynb", tmp_path / "01.ipynb", per_class=1,
                               similar_pairs=2, **notebook_folder)
    assert "folder: 3 classes, read from " in text and "{'train': 12, 'val': 9, 'test': 0}" in text


def test_notebook_02_previews_mixing_of_two_classes_on_a_folder(notebook_kernel, notebook_folder, tmp_path):
    text = notebook_kernel.run(NOTEBOOKS / "02_augmentation_preview.ipynb", tmp_path / "02.ipynb", image_size=48,
                               draws=4, **notebook_folder)
    (pairs,) = re.findall(r"pairs mixed: (.*)", text)  # val/ lists cat, cat, cat, dog, ...: its first 4 would not do
    assert len(pairs.split("; ")) == 2 and all(a != b for a, b in (p.split(" + ") for p in pairs.split("; ")))


def test_notebook_03_trains_on_a_folder(notebook_kernel, notebook_folder, tmp_path):
    # timm's tiny test network: what is tested is the notebook on a folder, not the model
    text = notebook_kernel.run(NOTEBOOKS / "03_train.ipynb", tmp_path / "03.ipynb", preset="cpu", backbone="test_resnet",
                               weights="none", image_size=32, epochs=2, batch_size=6,
                               checkpoint_dir=str(tmp_path / "ckpt"), run_name="nb", device="cpu", **notebook_folder)
    assert "12 training and 9 validation images" in text and "epoch 2/2" in text
    best = torch.load(tmp_path / "ckpt" / "nb" / "best.pt", weights_only=True)
    assert best["classes"] == ["cat", "dog", "frog"] and best["store_size"] == 48


def test_notebook_04_finds_the_folder_from_the_checkpoint_and_says_it_evaluates_val(notebook_kernel, trained_on_folder, tmp_path):
    _, best = trained_on_folder
    text = notebook_kernel.run(NOTEBOOKS / "04_evaluate.ipynb", tmp_path / "04.ipynb", checkpoint=str(best),
                               device="cpu", tta=False)
    assert "6 val images (this data has no test split, so: the validation split)" in text
    assert json.loads((best.parent / "metrics.json").read_text())["split"] == "val"


def photo(path: Path) -> Path:
    """A smooth 400x300 picture (so that any two good resizes of it agree closely)."""
    y, x = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], -1).astype(np.uint8)).save(path)
    return path


def test_notebook_05_predicts_a_folder_run_stored_at_64_px(notebook_kernel, trained_on_folder, tmp_path):
    _, best = trained_on_folder
    text = notebook_kernel.run(NOTEBOOKS / "05_inference_widget.ipynb", tmp_path / "05.ipynb", checkpoint=str(best),
                               demo_image=str(photo(tmp_path / "photo.jpg")), top_k=3)
    assert "3 classes" in text and "photo.jpg" in text
    assert sorted(re.findall(r"  \d\. +(\w+)", text)) == ["cat", "dog", "frog"]


def test_the_upload_widget_shows_a_folder_run_its_64_px_image(trained_on_folder, tmp_path):
    pytest.importorskip("ipywidgets", reason="the upload widget needs ipywidgets")
    from cifarlib.data.preprocess import cifar_like
    from cifarlib.serving.app import UploadApp
    _, best = trained_on_folder
    predictor = Predictor.from_checkpoint(best, device="cpu")
    app = UploadApp(predictor, top_k=3)
    data = photo(tmp_path / "photo.png").read_bytes()
    box = app.show_file("photo.png", data)
    caption, previews = box.children[0].children
    assert "64 px image the model sees" in caption.value and predictor.predict(data).top[0][0] in caption.value
    seen = Image.open(io.BytesIO(previews.children[1].value))
    assert seen.width == seen.height and seen.width % 64 == 0  # the 64 px image, each pixel a square block
    block = seen.width // 64
    shown = torch.from_numpy(np.asarray(seen.convert("RGB"))[::block, ::block].astype(np.float32))
    assert (shown - cifar_like(data, 64).permute(1, 2, 0).float()).abs().mean() < 4  # that image, not a 32 px one


def test_a_folder_whose_classes_changed_is_refused_showing_both_lists(trained_on_folder, tmp_path):
    root, best = trained_on_folder
    moved = tmp_path / "photos"
    shutil.copytree(root / "photos", moved)
    (moved / "frog").rename(moved / "toad")
    with pytest.raises(UserError, match=r"differ from the checkpoint's.*\n.*cat, dog, frog\n.*cat, dog, toad"):
        evaluate.evaluate_checkpoint(best, split="val", data_dir=str(moved), cache_dir=str(tmp_path / "c"), device="cpu")


def test_the_training_cli_takes_a_folder_and_its_store_size(tmp_path, capsys):
    make_folder(tmp_path / "photos", classes=("a", "b"), per_class=3)
    train.main(["dataset=folder", f"data_dir={tmp_path / 'photos'}", "store_size=48", f"cache_dir={tmp_path / 'c'}",
                "preset=cpu", "epochs=2", "backbone=resnet18", "weights=none", "image_size=32", "batch_size=4",
                f"checkpoint_dir={tmp_path / 'ckpt'}", "run_name=r", "device=cpu", "val_fraction=0.34"])
    assert "run files:" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt" / "r" / "best.pt", weights_only=True)["store_size"] == 48


@pytest.mark.skipif(not REAL.is_file(), reason="../shared/real/cifar10-train-jpeg.tar.gz is not beside the project")
def test_real_photos_train_a_tiny_epoch_and_predict_with_their_class_names(tmp_path):
    per_class, counts = 30, {}
    with tarfile.open(REAL, "r|gz") as tf:  # one pass: the archive lists one class after another
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and counts.get(parts[2], 0) < per_class:
                counts[parts[2]] = counts.get(parts[2], 0) + 1
                save_to = tmp_path / "photos" / parts[2] / parts[3]
                save_to.parent.mkdir(parents=True, exist_ok=True)
                save_to.write_bytes(tf.extractfile(m).read())
    assert len(counts) == 10 and set(counts.values()) == {per_class}
    run = train.prepare(replace(tiny_config(tmp_path, tmp_path / "photos", val_fraction=0.2), batch_size=48))
    assert len(run.data.train) == 240 and len(run.data.val) == 60
    rows = list(train.epochs(run))
    assert len(rows) == 1 and np.isfinite(rows[0]["val_loss"])
    p = Predictor.from_checkpoint(run.dir / "best.pt", device="cpu")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert p.classes == names
    photos = sorted((tmp_path / "photos" / "ship").iterdir())[:3]
    for result in p.predict(photos, top_k=10):
        assert sorted(name for name, _ in result.top) == names
