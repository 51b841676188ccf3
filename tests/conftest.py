import errno
import os
from contextlib import contextmanager

import pytest

from cifarlib.data import synthetic


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


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as before: runs compared with one another then do
    the same arithmetic."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """best.pt of a tiny run the suite trains itself (a clean clone has no earlier runs)."""
    from cifarlib.training import train
    from cifarlib.training.config import make_config

    root = tmp_path_factory.mktemp("trained")
    cfg = make_config("cpu", dataset="synthetic", weights="none", backbone="resnet18", image_size=32, epochs=3,
                      max_train_samples=320, max_eval_samples=100, data_dir=str(root / "data"),
                      checkpoint_dir=str(root / "ckpt"), run_name="tiny", device="cpu")
    run = train.prepare(cfg)
    for _ in train.epochs(run):
        pass
    return run.dir / "best.pt"


@pytest.fixture(scope="session")
def app_model(trained_checkpoint, tmp_path_factory):
    """The suite's checkpoint exported for the app's pages by `serve.page_model`, once, in this
    process: tests/test_onnx_page.py reads it, and the browser tests' servers find it (and its
    stamp) beside their prepared notebook, so they start without exporting. None where it cannot
    be exported (no onnxruntime): the servers then run the pages on PyTorch."""
    from cifarlib.serving import serve
    folder = tmp_path_factory.getbasetemp() / "app-model"
    folder.mkdir(exist_ok=True)
    return serve.page_model(trained_checkpoint, folder)


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


class SharedKernel:
    """A running Jupyter kernel, and `run(notebook, out, **parameters)`: the notebook under
    papermill in that kernel, from an empty namespace (`%reset`); the text of its outputs."""

    def __init__(self, km, kc):
        self.km, self.kc = km, kc

    def run(self, notebook, out, stream: bool = False, **parameters) -> str:
        """`stream`: through the project's runner, which prints what the cells print as it comes."""
        import nbformat
        import papermill as pm

        from cifarlib.core import notebook as runner
        self.reset()
        if stream:
            runner.run(notebook, out, parameters, km=self.km, progress_bar=False, stream=True)
        else:
            pm.execute_notebook(str(notebook), str(out), parameters=parameters, km=self.km, progress_bar=False)
        return "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))

    def reset(self) -> None:
        """An empty namespace (the modules stay imported)."""
        self.execute("%reset -f")

    def execute(self, code: str) -> None:
        """Run `code` in the kernel; it must succeed."""
        reply = self.kc.execute_interactive(code, timeout=60)["content"]
        assert reply["status"] == "ok", reply

    @contextmanager
    def one_thread(self):
        """torch on one thread inside the kernel, as OMP_NUM_THREADS=1 gives a fresh one (the
        arithmetic of runs compared with one-thread runs); the kernel's own count afterwards."""
        reply = self.kc.execute_interactive("import torch", user_expressions={"n": "torch.get_num_threads()"}, timeout=60)
        before = int(reply["content"]["user_expressions"]["n"]["data"]["text/plain"])
        assert self.kc.execute_interactive("torch.set_num_threads(1)", timeout=60)["content"]["status"] == "ok"
        try:
            yield self
        finally:
            self.kc.execute_interactive(f"import torch; torch.set_num_threads({before})", timeout=60)


@pytest.fixture(scope="session")
def notebook_kernel():
    """One kernel for the notebooks that tests run through it: torch, pandas, matplotlib and the
    rest are imported once for all of them (seconds each on 2 cores), not once per notebook."""
    pytest.importorskip("nbformat", reason="the notebook tests need nbformat and papermill")
    pytest.importorskip("papermill", reason="the notebook tests need nbformat and papermill")
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.blocking_client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield SharedKernel(km, kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
