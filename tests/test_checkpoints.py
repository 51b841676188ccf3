"""Checkpoint files and folders: a full disk mid-save and a folder that can't be written are one
clear message each, and nothing is lost."""

import errno
import os

import pytest
import torch

from cifarlib.core import files
from cifarlib.core.errors import UserError
from cifarlib.model import checkpoints


def test_torch_save_on_a_full_disk_raises_a_runtime_error_chained_on_enospc(tmp_path, full_disk):
    """What the full-disk message has to see through (torch 2.x): not the OSError itself."""
    full_disk(300_000)
    fd = os.open(tmp_path / "x.pt", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(RuntimeError) as e, os.fdopen(fd, "wb") as f:
        torch.save({"w": torch.zeros(1_000_000)}, f)
    assert isinstance(e.value.__context__, OSError) and e.value.__context__.errno == errno.ENOSPC


def test_a_full_disk_mid_save_is_the_full_disk_message_and_the_old_file_stays(tmp_path, full_disk):
    path = tmp_path / "best.pt"
    checkpoints.save({"format": checkpoints.FORMAT, "model": {"w": torch.ones(10)}}, path)
    full_disk(300_000)  # the next save, of 4 MB, fills the disk after 300 kB
    with pytest.raises(UserError, match=f"no space left on the disk while writing {path}; the previous version, "
                                        "if any, is untouched. Free some space and resume the run."):
        checkpoints.save({"format": checkpoints.FORMAT, "model": {"w": torch.zeros(1_000_000)}}, path)
    assert torch.equal(checkpoints.load(path)["model"]["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left


def test_other_save_errors_keep_their_traceback(tmp_path):
    with pytest.raises(TypeError):
        files.write_atomically(tmp_path / "x", lambda f: f.write("text, not bytes"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", ["check_writable", "prepare_run_dir"])
@pytest.mark.parametrize("where", ["under /proc", "a file in the way", "a file in the way, deeper"])
def test_a_checkpoint_dir_that_cannot_be_made_or_written_is_one_message_naming_it(tmp_path, where, call):
    (tmp_path / "file").write_text("not a folder")
    root = {"under /proc": "/proc/cifarlib-checkpoints", "a file in the way": tmp_path / "file",
            "a file in the way, deeper": tmp_path / "file" / "checkpoints"}[where]
    named = root if call == "check_writable" else f"{root}/run"
    with pytest.raises(UserError, match=f"the checkpoint folder {named} cannot be created or written "
                                        r"\(.+\)\. Choose another checkpoint_dir"):
        if call == "check_writable":
            checkpoints.check_writable(root)
        else:
            checkpoints.prepare_run_dir("run", resume=False, overwrite=False, root=str(root))


def test_a_writable_checkpoint_dir_is_made_and_left_clean(tmp_path):
    checkpoints.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    path = checkpoints.prepare_run_dir("run", resume=False, overwrite=False, root=str(tmp_path / "c"))
    assert path == tmp_path / "c" / "run" and path.is_dir() and list(path.iterdir()) == []


def test_a_disk_too_full_for_even_an_empty_file_is_the_full_disk_message(tmp_path, monkeypatch):
    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", no_room)
    with pytest.raises(UserError, match=f"no space left on the disk while writing {tmp_path / 'last.pt'}"):
        checkpoints.save({"format": checkpoints.FORMAT}, tmp_path / "last.pt")
