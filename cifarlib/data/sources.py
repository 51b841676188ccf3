"""Finding the CIFAR files on disk: extracted folder, then official tarball, then a download.

Everything here works on files; `cifarlib.data.datasets` turns the folder it returns into tensors.
Official MD5 checksums are verified by default; `verify_checksums=False` accepts files a user
rebuilt in the same pickle layout. Extraction and download go through temporary names and a
rename, so an interrupted or failed attempt never leaves a half-written folder or tarball that a
later run would pick up.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path


from ..core import progress
from ..core.errors import UserError, disk_full

DOWNLOAD_TIMEOUT_S = 10  # for the name lookup, the connection and each read


@dataclass(frozen=True)
class Source:
    """Where one dataset lives officially, and the checksums of its files."""
    title: str
    folder: str
    tarball: str
    url: str
    tarball_md5: str
    md5: dict[str, str]  # file in `folder` -> MD5
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str


SOURCES = {
    "cifar100": Source(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"},
        ("train",), ("test",), "meta"),
    "cifar10": Source(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f",
         "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
         "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
         "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"},
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta"),
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_md5(path: Path, expected: str, what: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise UserError(
            f"checksum mismatch for {path}: expected MD5 {expected}, found {actual}. The {what} is "
            "truncated, corrupt or not the official file. Delete it to fetch it again, or pass "
            "verify_checksums=False if you rebuilt it yourself in the official pickle layout.")


def _check_folder(folder: Path, src: Source, verify: bool) -> None:
    missing = [f for f in src.md5 if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is incomplete: {', '.join(missing)} missing. Complete it from the "
                        f"official {src.tarball}, or delete the folder to extract or download afresh.")
    if verify:
        for name, expected in src.md5.items():
            _check_md5(folder / name, expected, f"{src.title} file")


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; if another process already did, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError as e:
        if not (e.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.is_dir()):
            raise


def _disk_full(e: OSError, path: Path, setting: str = "data_dir") -> UserError | None:
    return disk_full(e, path, "nothing was kept", f"Free some space, or choose another {setting}.")


def extract(tarball: Path, src: Source) -> Path:
    """Unpack the official tarball into its folder beside it, all or nothing."""
    final = tarball.parent / src.folder
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=tarball.parent))
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            wanted = {f"{src.folder}/{name}" for name in src.md5}
            members = [m for m in tf.getmembers() if m.name in wanted and m.isfile()]
            missing = sorted(wanted - {m.name for m in members})
            if missing:
                raise UserError(f"{tarball} is not the official {src.title} tarball: it lacks "
                                f"{', '.join(missing)}. Delete it, or place the official file there.")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tf.extractall(tmp, members=members, filter="data")
            else:
                tf.extractall(tmp, members=members)
        (tmp / src.folder).chmod(0o755)
        move_into_place(tmp / src.folder, final)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"{tarball} is truncated or corrupt ({e}); nothing was extracted. "
                        "Delete it and place the official file there, or allow the download.") from None
    except OSError as e:
        raise (_disk_full(e, final) or UserError(
            f"{tarball} could not be extracted ({e}); nothing was extracted. "
            "Delete it and place the official file there, or allow the download.")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def unreachable(host: str, timeout: float) -> str | None:
    """Look `host` up within `timeout` seconds: None if it resolved, else the reason it can't be
    reached. The one network check, for data downloads and for pretrained weights.

    `urlopen`'s timeout does not cover the name lookup, which can hang for a minute on a machine
    without network; a daemon thread bounds it.
    """
    box: dict[str, str | None] = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            box["err"] = None
        except OSError as e:
            box["err"] = f"cannot resolve {host} ({e})"

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("err", f"looking up {host} took over {timeout:g} s")


def download(src: Source, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> str | None:
    """Download the official tarball to `dest` and check it; None on success, else the reason."""
    reason = unreachable(urllib.parse.urlsplit(src.url).hostname or "", timeout)
    if reason:
        return reason
    part = dest.with_name(dest.name + ".part")
    try:
        response = urllib.request.urlopen(src.url, timeout=timeout)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused, TLS
        return f"the download from {src.url} failed ({getattr(e, 'reason', e)})"
    complete = False
    try:
        with response, open(part, "wb") as f, progress.bar(
                total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                unit_scale=True, desc=f"downloading {src.tarball}") as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as e:  # the network, not the disk
                    return f"the download from {src.url} broke off ({e})"
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
        complete = True
    except OSError as e:  # writing failed
        raise (_disk_full(e, part) or UserError(f"could not write {part}: {e}")) from None
    finally:
        if not complete:
            part.unlink(missing_ok=True)
    if md5sum(part) != src.tarball_md5:
        part.unlink(missing_ok=True)
        return f"the file downloaded from {src.url} did not match the official checksum"
    os.replace(part, dest)
    return None


def locate(name: str, data_dir: Path, verify_checksums: bool = True, allow_download: bool = True,
           may_write: bool = True) -> Path:
    """The extracted folder of dataset `name` under `data_dir`, extracting or downloading it.

    `may_write=False` (torchrun ranks other than 0) only looks for the folder.
    """
    src = SOURCES[name]
    folder, tarball = data_dir / src.folder, data_dir / src.tarball
    if folder.is_dir():
        _check_folder(folder, src, verify_checksums)
        return folder
    if may_write and tarball.is_file():
        if verify_checksums:
            _check_md5(tarball, src.tarball_md5, f"{src.title} tarball")
        return extract(tarball, src)
    if not may_write:
        reason = "the main process (rank 0) did not provide it"
    elif not allow_download:
        reason = "the download is switched off (download=False)"
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        reason = download(src, tarball)
        if reason is None:
            return extract(tarball, src)
    raise UserError(
        f"{src.title} was not found, and {reason}.\nLooked for:\n"
        f"  the extracted folder  {folder}/\n  the official tarball  {tarball}\n"
        f"Fix it in one of three ways:\n"
        f"  1. place the extracted folder (official layout: {', '.join(src.md5)}) at {folder}/\n"
        f"  2. place the official tarball at {tarball}\n"
        f"  3. allow the download: download=True on a machine that can reach {src.url}")
