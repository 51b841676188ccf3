"""Your own pictures as a dataset: a folder of class folders, or an archive of one.

    data = load_cifar("folder", "path/to/photos", store_size=64)   # the same CifarData as CIFAR

`data_dir` is one of:

- a folder in the usual layout: `train/<class>/*`, with optional `val/<class>/*` (or `valid/`,
  `validation/`) and `test/<class>/*`;
- a folder of `<class>/*` alone, taken as the training split;
- a `.tar`, `.tar.gz`, `.tgz` or `.zip` of either, extracted once, all or nothing, into
  `cache_dir/extracted/` (never beside the archive, which may be read-only), and again only if
  the archive changes.

At the top, a wrapping folder is unwrapped while the top holds exactly one folder and no files;
`train/`, `val/`, `test/` and class folders (a class folder holds files) never are. Class names
are the sorted folder names. Names starting with "." are ignored, and so is `__MACOSX/` (macOS
puts it in zip files); every other file anywhere below a class folder is tried as an image, as
torchvision's ImageFolder does.

Validation is the validation folder if there is one, else a stratified, seeded `val_fraction` of
`train/`; then the caps. All of it picks files, before anything is decoded; `cifarlib.data.imagecache`
decodes only the picked files, at `store_size`, and caches them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import placement, runtime
from ..core.errors import UserError, notice
from . import imagecache, sources
from .splits import SPLITS, CifarData, Split, pick_splits

VAL_NAMES = ("val", "valid", "validation")
SPLIT_NAMES = ("train", *VAL_NAMES, "test")
ARCHIVE = re.compile(r"\.(tar|tar\.gz|tgz|zip)$", re.IGNORECASE)
STAMP = ".cifarlib-archive"  # in an extracted folder: which archive, of what size and date
LAYOUT = "train/<class>/... (with optional val/ and test/) or <class>/..."


def _visible(folder: str | Path) -> list[os.DirEntry]:
    """The entries of `folder` that count, sorted by name."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".") and e.name != "__MACOSX"), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read the folder {folder} ({e.strerror or e}).") from None


def _is_dir(e: os.DirEntry) -> bool:
    """Whether `e` is a folder, or a link to one; a link that cannot be followed (broken, or a
    link to itself) is not."""
    try:
        return e.is_dir()
    except OSError:
        return False


def unwrap(folder: Path) -> Path:
    """Go down through wrapping folders: while `folder` holds exactly one folder and no files,
    and that folder holds only folders and is not named like a split."""
    while True:
        entries = _visible(folder)
        if len(entries) != 1 or not _is_dir(entries[0]) or entries[0].name.lower() in SPLIT_NAMES:
            return folder
        inner = _visible(entries[0].path)
        if not inner or not all(_is_dir(e) for e in inner):  # empty, or a class folder
            return folder
        folder = Path(entries[0].path)


def extract_archive(archive: Path, cache_dir: Path, may_write: bool = True) -> Path:
    """The archive's contents under `cache_dir/extracted/`, extracted there once."""
    st = archive.stat()
    final = cache_dir / "extracted" / f"{ARCHIVE.sub('', archive.name)}-{imagecache.digest(str(archive.resolve()))}"
    stamp = f"{archive.resolve()}\n{st.st_size} {st.st_mtime_ns}\n"
    current = lambda: (final / STAMP).is_file() and (final / STAMP).read_text() == stamp  # noqa: E731
    if current():
        return final
    if not may_write:
        raise UserError(f"{archive} is not extracted in {final.parent}: the main process (rank 0) did not provide it.")
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=final.parent))
        notice(f"extracting {archive} into {final}")
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and ".." from member names
        else:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            with tarfile.open(archive, "r|*") as tf:  # one pass over the stream
                for member in tf:
                    tf.extract(member, tmp, **safe)
        (tmp / STAMP).write_text(stamp)
        if not current():  # else another process has just extracted it: keep theirs
            if final.exists():
                shutil.rmtree(final)  # an older extraction of a changed archive
            sources.move_into_place(tmp, final)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise UserError(f"{archive} is truncated, corrupt or not a {LAYOUT} archive ({e}); "
                        "nothing was extracted.") from None
    except OSError as e:
        raise (sources._disk_full(e, final, "cache_dir") or UserError(
            f"{archive} could not be extracted into {final.parent} ({e}); nothing was kept.")) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def locate(data_dir: str | Path, cache_dir: str | Path, may_write: bool = True) -> Path:
    """The dataset's top folder: `data_dir` itself, or its archive extracted; then unwrapped."""
    path = runtime.resolve_path(data_dir)
    hint = f"data_dir must be a folder of pictures ({LAYOUT}) or a .tar, .tar.gz or .zip of one"
    if not path.exists():
        raise UserError(f"data_dir {path} does not exist; {hint}.")
    if path.is_file():
        if not ARCHIVE.search(path.name):
            raise UserError(f"data_dir {path} is a file but not an archive; {hint}.")
        path = extract_archive(path, runtime.resolve_path(cache_dir), may_write)
    root = unwrap(path)
    if not _visible(root):
        raise UserError(f"data_dir {path} is empty; {hint}.")
    return root


@dataclass
class Listing:
    """Every candidate file below the class folders, and the splits found on disk."""
    root: Path
    classes: list[str]
    folders: dict[str, Path]       # split -> its folder ("train" is `root` in the <class>/* layout)
    paths: list[str]               # relative to root, in a fixed order
    sizes: list[int]
    mtimes: list[int]              # nanoseconds
    splits: dict[str, Split]       # images = indices into `paths`
    skipped: list[str]             # "path: reason" for files outside any class folder


def _real_ids(folder: str) -> set[tuple[int, int]]:
    """(device, inode) of `folder` and of every folder above it, links resolved."""
    return {(st.st_dev, st.st_ino) for st in map(os.stat, (folder, *Path(folder).resolve().parents))}


def _walk(folder: str, rel: str, out: Listing, label: int, labels: list[int],
          above: set[tuple[int, int]]) -> None:
    """List the files below `folder` into `out`. `above` holds the real folders this walk is
    inside: a link to one of them is a loop (its target holds the link again), which is noted in
    `out.skipped` and not followed."""
    for e in _visible(folder):
        try:
            st = e.stat()  # through links
        except OSError as err:  # a broken link, a link to itself
            out.skipped.append(f"{rel}{e.name}: unreadable ({err.strerror})")
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in above:
                out.skipped.append(f"{rel}{e.name}: a link to {os.path.realpath(e.path)}, a folder it is "
                                   "itself in (a loop): not followed")
            else:
                _walk(e.path, f"{rel}{e.name}/", out, label, labels, above | {key})
            continue
        out.paths.append(rel + e.name)
        out.sizes.append(st.st_size)
        out.mtimes.append(st.st_mtime_ns)
        labels.append(label)


def _class_folders(split_dir: Path, rel: str, out: Listing) -> list[str]:
    entries = _visible(split_dir)
    out.skipped += [f"{rel}{e.name}: not inside a class folder" for e in entries if not _is_dir(e)]
    return [e.name for e in entries if _is_dir(e)]


def _split_folders(root: Path) -> tuple[dict[str, Path], list[str]]:
    top = {e.name.lower(): e for e in _visible(root) if _is_dir(e)}
    vals = [top[n].name for n in VAL_NAMES if n in top]
    if len(vals) > 1:
        raise UserError(f"{root} has {len(vals)} validation folders ({', '.join(v + '/' for v in vals)}); "
                        "keep one.")
    if "train" not in top:
        if vals or "test" in top:
            raise UserError(f"{root} has {', '.join(top[n].name + '/' for n in SPLIT_NAMES if n in top)} "
                            f"but no train/ folder; expected {LAYOUT}.")
        return {"train": root}, []
    folders = {"train": root / top["train"].name}
    if vals:
        folders["val"] = root / vals[0]
    if "test" in top:
        folders["test"] = root / top["test"].name
    others = [e.name for e in _visible(root) if e.name.lower() not in SPLIT_NAMES]
    return folders, [f"{name}: outside train/, {'/'.join(VAL_NAMES)}/ and test/" for name in others]


def list_folder(root: Path) -> Listing:
    """List the dataset at `root`; every problem with its layout is a UserError naming the path."""
    folders, skipped = _split_folders(root)
    out = Listing(root, [], folders, [], [], [], {}, skipped)
    for split, folder in folders.items():
        rel = "" if folder == root else folder.name + "/"
        names = _class_folders(folder, rel, out)
        if split == "train":
            out.classes = names
            if len(names) < 2:
                raise UserError(f"{folder} has {len(names)} class folder(s) ({', '.join(names) or 'none'}); a dataset "
                                f"needs at least two classes, one folder each: {LAYOUT}.")
        elif names != out.classes:
            only_train, only_here = sorted(set(out.classes) - set(names)), sorted(set(names) - set(out.classes))
            raise UserError(f"the class folders of {folder} differ from those of {folders['train']}: only in the "
                            f"training folder: {', '.join(only_train) or 'none'}; only in {folder.name}/: "
                            f"{', '.join(only_here) or 'none'}.")
        first, labels = len(out.paths), []
        for label, name in enumerate(names):
            before = len(labels)
            _walk(str(folder / name), f"{rel}{name}/", out, label, labels, _real_ids(str(folder / name)))
            if len(labels) == before:
                raise UserError(f"the class folder {folder / name} has no usable image (no files in it).")
        out.splits[split] = Split(torch.arange(first, len(out.paths)), torch.tensor(labels, dtype=torch.int64))
    return out


def _usable(listing: Listing, name: str, split: Split, files: torch.Tensor, images: torch.Tensor,
            reasons: list[str]) -> Split:
    """The images of split `name` (file indices and labels) whose files decoded; `reasons` are
    those of `files`, and `images` those of the files that decoded, in the order of `files`. A
    class whose picked files all failed is an error. A split whose images lie together in
    `images`, in order, is a view of them: no copy."""
    row = torch.full((len(listing.paths),), -1, dtype=torch.int64)
    ok = torch.tensor([not why for why in reasons], dtype=torch.bool)
    row[files[ok]] = torch.arange(int(ok.sum()))
    rows = row[split.images]
    keep = rows >= 0
    had, has = (torch.bincount(labels, minlength=len(listing.classes)) for labels in (split.labels, split.labels[keep]))
    lost = ((had > 0) & (has == 0)).nonzero().flatten().tolist()
    if lost:
        folder = listing.folders.get(name, listing.folders["train"]) / listing.classes[lost[0]]
        raise UserError(f"the class folder {folder} has no usable image: none of the {int(had[lost[0]])} file(s) "
                        f"picked from it for the {name} split decodes (see the skipped files above).")
    rows = rows[keep]
    first = int(rows[0]) if len(rows) else 0
    together = torch.equal(rows, torch.arange(first, first + len(rows)))
    return Split(images[first:first + len(rows)] if together else images[rows], split.labels[keep])


def load_folder(data_dir: str | Path, *, cache_dir: str | Path = "data", store_size: int = 32,
                val_fraction: float = 0.1, seed: int = 0, max_train_samples: int | None = None,
                max_eval_samples: int | None = None, splits: tuple[str, ...] = SPLITS,
                device: str | torch.device = "auto", data_on: str = "auto") -> CifarData:
    """The dataset at `data_dir` as `CifarData` for `device` (see the module docstring); only
    the `splits` named are decoded, the others are empty. The pictures are placed where
    `data_on` says (`placement.place_data`), decided before decoding from their size; on disk
    they stay in the image cache, memory-mapped. Use it through `load_cifar`."""
    if not isinstance(store_size, int) or isinstance(store_size, bool) or store_size < 1:
        raise UserError(f"store_size must be a positive whole number of pixels, not {store_size!r}.")
    if not set(splits) <= set(SPLITS):
        raise UserError(f"splits must be among {', '.join(SPLITS)}, not {splits!r}.")
    dev, cache = runtime.pick_device(device), runtime.resolve_path(cache_dir)
    with runtime.main_process_first():
        root = locate(data_dir, cache, may_write=runtime.is_main_process())
    listing = list_folder(root)
    none = Split(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    picked = pick_splits(listing.splits["train"], listing.splits.get("val"), listing.splits.get("test", none),
                         val_fraction, seed, max_train_samples, max_eval_samples)
    picked = {name: s if name in splits else none for name, s in zip(SPLITS, picked)}
    # the training files in a seeded random order, which is the order they are cached in: a block
    # of neighbours in the cache (`order="block"`) then holds many classes, not one class folder's
    # files (with class folders in order, the block order cost 22 points of accuracy: README)
    picked["train"] = picked["train"].subset(torch.randperm(len(picked["train"]),
                                                            generator=torch.Generator().manual_seed(seed + 4)))
    # the splits' files one after the other (they are distinct), so that each split's images are
    # decoded side by side, and are a view of what was decoded
    files = torch.tensor(list(dict.fromkeys(torch.cat([s.images for s in picked.values()]).tolist())),
                         dtype=torch.int64)
    where, why = placement.place_data(data_on, len(files) * 3 * store_size * store_size, dev)
    if listing.skipped:
        notice(f"{len(listing.skipped)} file(s) or folder(s) are ignored: "
               + "; ".join(listing.skipped[:3]) + ("; ..." if len(listing.skipped) > 3 else ""))
    with runtime.main_process_first():
        images, reasons = imagecache.load(listing.root, listing.paths, listing.sizes, listing.mtimes,
                                          files.tolist(), store_size, cache, may_write=runtime.is_main_process(),
                                          contiguous=where == "disk")
    out = {name: _usable(listing, name, split, files, images, reasons) for name, split in picked.items()}
    failed = [f"{listing.paths[i]}: {r}" for i, r in zip(files.tolist(), reasons) if r]
    data = CifarData("folder", listing.root, listing.classes, None, out["train"], out["val"], out["test"],
                     skipped=tuple(listing.skipped + failed))
    return data.place(where, dev, why)
