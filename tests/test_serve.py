"""`make app` before Voilà starts: the checkpoint is checked, the parameters injected, the port free.
(The served page itself is tested in a browser: tests/test_app_browser.py.)"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from cifarlib.core.errors import UserError
from cifarlib.serving import serve


def test_no_best_pt_is_a_clear_error_naming_the_folder_and_make_demo(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")  # a run without best.pt does not count
    with pytest.raises(UserError, match=rf"no best.pt under {tmp_path}.*`make demo`.*training run"):
        serve.pick_checkpoint("", root=str(tmp_path))


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_an_unusable_checkpoint_is_a_clear_error_naming_it_and_make_demo(kind, tmp_path, trained_checkpoint):
    path = tmp_path / "best.pt"
    if kind == "truncated":
        path.write_bytes(trained_checkpoint.read_bytes()[:5000])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    message = {"missing": "does not exist", "truncated": "not a readable checkpoint", "foreign": "not a cifarlib checkpoint"}
    with pytest.raises(UserError, match=rf"{path}.*{message[kind]}.*`make demo`"):
        serve.pick_checkpoint(str(path))


def test_the_newest_best_pt_is_served_by_default(tmp_path, trained_checkpoint):
    assert serve.pick_checkpoint("", root=str(trained_checkpoint.parents[1])) == trained_checkpoint
    for name, when in (("older", 1_000_000), ("newer", 2_000_000), ("oldest", 500_000)):  # not in name order
        (tmp_path / name).mkdir()
        shutil.copy(trained_checkpoint, tmp_path / name / "best.pt")
        os.utime(tmp_path / name / "best.pt", (when, when))
    assert serve.pick_checkpoint("", root=str(tmp_path)) == tmp_path / "newer" / "best.pt"
    assert serve.pick_checkpoint(str(trained_checkpoint)) == trained_checkpoint


def test_the_checkpoint_and_its_model_are_injected_as_papermill_does(tmp_path, trained_checkpoint):
    pytest.importorskip("papermill", reason="needs papermill")
    model = tmp_path / "model.onnx"
    for onnx_model, expected in ((model, {"checkpoint": str(trained_checkpoint), "onnx_model": str(model)}),
                                 (None, {"checkpoint": str(trained_checkpoint)})):  # PyTorch: the notebook's default
        out = serve.prepare(trained_checkpoint, str(tmp_path / "app" / "05.ipynb"), onnx_model)
        nb = json.loads(out.read_text())
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert len(injected) == 1 and f'checkpoint = "{trained_checkpoint}"' in "".join(injected[0]["source"])
        assert nb["metadata"]["papermill"]["parameters"] == expected
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")  # prepared, not run


def fake_export(calls):
    """cifarlib.serving.export.export as far as page_model sees it: the two files, and the call counted."""
    def export(checkpoint, out, cams=False):
        calls.append((checkpoint, out, cams))
        out.write_bytes(b"onnx")
        out.with_name(out.name + ".json").write_text("{}")
        return out, out.with_name(out.name + ".json")
    return export


def test_the_pages_model_is_exported_once_and_again_when_the_checkpoint_changes(tmp_path, trained_checkpoint,
                                                                                 monkeypatch):
    from cifarlib.serving import export
    calls = []
    monkeypatch.setattr(export, "export", fake_export(calls))
    checkpoint = tmp_path / "best.pt"
    shutil.copy(trained_checkpoint, checkpoint)
    folder = tmp_path / "app"
    folder.mkdir()
    assert serve.page_model(checkpoint, folder) == folder / "model.onnx" and calls == [(checkpoint, folder / "model.onnx", True)]
    assert serve.page_model(checkpoint, folder) == folder / "model.onnx" and len(calls) == 1  # kept
    os.utime(checkpoint, ns=(1, 1))  # a new checkpoint in the same place
    assert serve.page_model(checkpoint, folder) == folder / "model.onnx" and len(calls) == 2
    (folder / "model.onnx.json").unlink()  # a half-copied folder
    serve.page_model(checkpoint, folder)
    assert len(calls) == 3


def test_a_checkpoint_that_cannot_be_exported_is_served_on_pytorch_with_a_notice(tmp_path, trained_checkpoint,
                                                                                 monkeypatch, capsys):
    from cifarlib.serving import export

    def refuse(*a, **k):
        raise UserError("--cams needs a head of global average pooling and one linear layer; export without it.")
    monkeypatch.setattr(export, "export", refuse)
    assert serve.page_model(trained_checkpoint, tmp_path) is None
    out = capsys.readouterr().out
    assert "Serving on PyTorch instead" in out and "--cams needs a head" in out
    assert serve.page_mb(trained_checkpoint, None) == (serve.PAGE_MB["torch"] + round(trained_checkpoint.stat().st_size / 1e6)
                                                       + serve.PICTURE_MB + 2 * serve.MAX_MESSAGE // 1_000_000)


def test_the_visitor_limit_is_what_the_available_memory_holds(monkeypatch):
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 20_000_000_000})())
    assert serve.default_max_visitors(200, pool=2) == ((20_000 - serve.RESERVE_MB) // 200 - 2, 20_000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 900_000_000})())
    assert serve.default_max_visitors(200, pool=2) == (1, 900)  # never less than one


def test_the_server_reads_the_memory_itself_and_warns_when_it_holds_fewer_pages_than_the_pool(monkeypatch, capsys):
    """In the server's own process (torch and the model given back), from a page's peak: the upload
    goal and the message held twice included."""
    import psutil

    from cifarlib.serving import appserver
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 20_000_000_000})())
    assert appserver.visitor_limit(0, 500, pool=2) == (20_000 - serve.RESERVE_MB) // 500 - 2
    assert "a page may take 500 MB at its peak" in capsys.readouterr().out
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 1_800_000_000})())
    assert appserver.visitor_limit(0, 500, pool=2) == 1
    assert "warning: the memory available holds fewer pages (1) than the pool of 2" in capsys.readouterr().out


def test_the_app_answers_only_to_its_own_names():
    from types import SimpleNamespace

    from cifarlib.serving import appserver
    allowed = appserver.allowed_hosts("0.0.0.0", ["192.168.1.5", " My.Host "])
    assert allowed == {"127.0.0.1", "localhost", "::1", "192.168.1.5", "my.host"}
    check = appserver.host_checker(allowed)
    handler = lambda host: SimpleNamespace(request=SimpleNamespace(host=host), log=SimpleNamespace(warning=print))  # noqa: E731
    assert check(handler("localhost:8866")) and check(handler("[::1]:8866")) and check(handler("my.host"))
    assert not check(handler("evil.example:8866")) and not check(handler("192.168.1.6:8866"))
    assert appserver.allowed_hosts("10.0.0.2", []) == {"127.0.0.1", "localhost", "::1", "10.0.0.2"}


def test_a_busy_port_is_a_clear_error_instead_of_another_port():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"127.0.0.1:{port}.*make app PORT={port + 1}"):
            serve.check_port_free("127.0.0.1", port)


@pytest.mark.parametrize("args", [["--pool", "-1"], ["--max-visitors", "-2"], ["--cull-idle", "0"], ["--per-client", "-1"]])
def test_bad_settings_exit_2_with_one_line(args, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cifarlib.serve", *args, "--prepared", str(tmp_path / "05.ipynb")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--max-visitors, --pool and --per-client must be" in r.stderr


def test_cli_exits_2_with_one_line_before_starting_voila(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cifarlib.serve", "--checkpoint", str(tmp_path / "none.pt"),
                        "--prepared", str(tmp_path / "05.ipynb")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "none.pt does not exist" in r.stderr and "make demo" in r.stderr
    assert not (tmp_path / "05.ipynb").exists()
