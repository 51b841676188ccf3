"""Interruptions and failures lose nothing: SIGINT, SIGTERM, a notebook's interrupt, a killed
process or kernel, a non-finite loss, out of memory.

Every interrupted run is compared with one uninterrupted reference run (a module fixture): after
resuming it must end with the same history, `seconds` and `images_per_s` aside, and the same
final validation loss. All runs use one thread (OMP_NUM_THREADS=1 for subprocesses,
torch.set_num_threads(1) in this process, `SharedKernel.one_thread` in the suite's shared kernel),
so that their arithmetic is the same. Each kind of process is started where it is the subject (the
command's exit status and message, torchrun's two ranks, a papermill command's kernel); the runs
that only continue or compare run in this process or in the shared kernel.

Where a test acts on a run at a point of its progress (kills it after a save inside epoch 2,
signals it once epoch 1 is saved), the run stops itself there (tests/hooks/pause_hook.py): the
test never polls a file while the run goes on, which raced the run's pace both ways.
"""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarlib.core import runtime
from cifarlib.core.errors import UserError
from cifarlib.data.augment import BatchAugment
from cifarlib.model import checkpoints
from cifarlib.training import curves, guard, train
from cifarlib.training.config import Stage, make_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(preset="cpu", dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=32,
            max_train_samples=192, max_eval_samples=50, device="cpu", epochs=3)  # 6 steps an epoch: 1 head, 2 all
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMED = ("seconds", "images_per_s")
HOOKS = Path(__file__).resolve().parent / "hooks"


def comparable(rows):
    return [{k: str(v) for k, v in r.items() if k not in TIMED} for r in rows]


def final_val_loss(folder: Path) -> float:
    return checkpoints.load(folder / "last.pt")["metrics"]["val_loss"]


def cli(root: Path, *args: str, pause_at: Path | None = None, when: str = "written") -> subprocess.Popen:
    kv = {**TINY, "data_dir": root / "data", "checkpoint_dir": root / "ckpt"}
    return subprocess.Popen([sys.executable, "-m", "cifarlib.train", *[f"{k}={v}" for k, v in kv.items()], *args],
                            env=pausing(pause_at, when), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pausing(pause_at: Path | None, when: str = "written") -> dict:
    """The environment of a command that stops itself (SIGSTOP) once `pause_at` is written, or
    with when="mid-epoch" once it holds a save from inside an epoch (tests/hooks)."""
    if pause_at is None:
        return ENV
    return {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), ENV.get("PYTHONPATH")])),
            "CIFARLIB_TEST_PAUSE_AT": str(pause_at), "CIFARLIB_TEST_PAUSE_WHEN": when}


def stopped(pid: int, timeout: float = 240) -> None:
    """Wait until process `pid` has stopped itself (a stopped process stays so: no race); fail if
    it ends first."""
    import psutil
    process, deadline = psutil.Process(pid), time.monotonic() + timeout
    while process.status() != psutil.STATUS_STOPPED:
        assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE, f"process {pid} ended before it paused"
        assert time.monotonic() < deadline, f"process {pid} did not pause within {timeout} s"
        time.sleep(0.02)


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to process `pid` (Linux: /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(mask >> (signum - 1) & 1 for mask in masks)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupts")


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run, through the command line's `main` in this process, on one thread as
    the commands here: its history rows (as read back) and its folder."""
    kv = {**TINY, "data_dir": root / "data", "checkpoint_dir": root / "ckpt", "run_name": "reference"}
    printed = io.StringIO()
    with single_thread(), contextlib.redirect_stdout(printed):
        train.main([f"{k}={v}" for k, v in kv.items()])
    folder = root / "ckpt" / "reference"
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("device plan: cpu, fp32, unfused optimizer, channels_last, a check every 1 optimizer step")
    assert [line.split(" [")[0] for line in lines[1:4]] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert lines[4] == f"run files: {folder}" and len(lines) == 5  # one plain line per epoch on stdout
    return checkpoints.read_history(folder / "history.csv"), folder


@contextlib.contextmanager
def single_thread():
    """torch on one thread in this process, as OMP_NUM_THREADS=1 gives the commands; then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def finish(root: Path, name: str) -> None:
    """Resume run `name` in this process and train it to its end, as `resume=True` on the command line does."""
    for _ in train.epochs(train.prepare(tiny(root, name, resume=True))):
        pass


def tiny(root: Path, name: str, **kw):
    return make_config(**{**TINY, "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"), "run_name": name, **kw})


def test_history_has_a_learning_rate_per_layer_group_and_the_training_rate(reference):
    rows, folder = reference
    assert list(rows[0]) == ["epoch", "stage", "stage_epoch", "data_epochs", "lr_stem", "lr_layer1", "lr_layer2", "lr_layer3",
                             "lr_layer4", "lr_head", "train_loss", "val_loss", "val_acc", "seconds", "images_per_s"]
    assert [float(rows[0][f"lr_{g}"]) for g in ("stem", "layer4")] == [0.0, 0.0]  # frozen in the head stage
    assert all(float(rows[2][f"lr_{g}"]) > 0 for g in ("layer2", "layer4", "head")) and float(rows[1]["images_per_s"]) > 0
    assert [float(rows[2][f"lr_{g}"]) for g in ("stem", "layer1")] == [0.0, 0.0]  # the cpu preset's "top" leaves them frozen
    panel = curves.loss_curves(rows).axes[1]  # the learning-rate panel: one line per slot, log scale
    solid = [line for line in panel.get_lines() if line.get_linestyle() != ":"]  # dotted: frozen spans
    assert len(solid) == 6 and panel.get_yscale() == "log"


@pytest.mark.parametrize("signum,where,how", [
    (signal.SIGINT, "mid-epoch", "from disk"), (signal.SIGTERM, "mid-epoch", "in memory"),
    (signal.SIGINT, "boundary", "in memory"), (signal.SIGTERM, "boundary", "from disk")])
def test_a_signal_saves_the_exact_step_and_the_run_ends_as_if_never_interrupted(
        signum, where, how, root, reference, one_thread, monkeypatch):
    name = f"{signal.Signals(signum).name}-{where}-{how.split()[-1]}"
    calls = []
    if where == "mid-epoch":  # during the 4th batch of epoch 2: that step finishes, then it stops
        real = BatchAugment.__call__
        monkeypatch.setattr(BatchAugment, "__call__", lambda self, x, y: (
            calls.append(1), len(calls) == 6 + 4 and os.kill(os.getpid(), signum), real(self, x, y))[2])
        expect = "interrupted at epoch 2 step 4"
    else:  # during epoch 1's validation: epoch 1 completes and is saved, epoch 2 never starts
        real = train.validate
        monkeypatch.setattr(train, "validate", lambda run, model: (
            calls.append(1), len(calls) == 1 and os.kill(os.getpid(), signum), real(run, model))[2])
        expect = "interrupted at epoch 2 step 0"
    run = train.prepare(tiny(root, name))
    with pytest.raises(guard.Interrupted, match=f"{expect}; continue with run_name={name} resume=True") as e:
        for _ in train.epochs(run):
            pass
    assert e.value.exit_status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    saved = checkpoints.load(run.dir / "last.pt")["resume"]
    assert (saved["step"], saved["next_stage"], saved["next_epoch"]) == (4 if where == "mid-epoch" else 0, 1, 0)
    monkeypatch.undo()
    if how == "from disk":
        run = train.prepare(tiny(root, name, resume=True))
    rows = list(train.epochs(run))  # in memory: what re-running notebook 03's training cell does
    history = checkpoints.read_history(run.dir / "history.csv")
    assert len(rows) == 2 and comparable(history) == comparable(reference[0])
    assert abs(final_val_loss(run.dir) - final_val_loss(reference[1])) <= 1e-6


def test_the_cli_saves_then_exits_130_on_sigint_and_143_on_sigterm(root, reference, one_thread):
    """Two commands at once (one thread each): SIGINT to one, SIGTERM to the other, each in epoch 2
    or while epoch 1 is saved."""
    statuses = {signal.SIGINT: 130, signal.SIGTERM: 143}
    runs = {signum: cli(root, f"run_name=cli-{status}", pause_at=root / "ckpt" / f"cli-{status}" / "history.csv")
            for signum, status in statuses.items()}
    for signum, p in runs.items():  # each paused itself once epoch 1's row was written
        stopped(p.pid)
        p.send_signal(signum)
        os.kill(p.pid, signal.SIGCONT)
    for signum, p in runs.items():
        name = f"cli-{statuses[signum]}"
        out, err = p.communicate(timeout=120)
        assert p.returncode == statuses[signum], err[-2000:]
        message = err.strip().splitlines()[-1].split("\r")[-1].strip()
        assert message.startswith("python -m cifarlib.train: interrupted at epoch ") and message.endswith(
            f"; continue with run_name={name} resume=True") and "Traceback" not in err
    finish(root, "cli-143")  # resumed in this process: the command's own code (the torchrun test resumes a command)
    history = root / "ckpt" / "cli-143" / "history.csv"
    assert comparable(checkpoints.read_history(history)) == comparable(reference[0])
    assert abs(final_val_loss(history.parent) - final_val_loss(reference[1])) <= 1e-6


def test_after_sigkill_a_periodic_save_loses_only_the_steps_since(root, reference, one_thread):
    """`save_every_minutes` covers kills that give no warning. The run saves at almost every step
    (every 0.6 ms, when the saver is free) and pauses itself after its first save inside an epoch:
    after epoch 1's first step, where the saver is always free. (Inside epoch 2 it may still be
    writing epoch 1's files on a loaded machine; the signal tests resume inside epoch 2.)"""
    last = root / "ckpt" / "killed" / "last.pt"
    p = cli(root, "run_name=killed", "save_every_minutes=0.00001", pause_at=last, when="mid-epoch")
    stopped(p.pid)
    saved = checkpoints.load(last)["resume"]
    p.kill()
    p.communicate()
    assert saved["step"] > 0  # inside an epoch
    finish(root, "killed")
    assert comparable(checkpoints.read_history(last.parent / "history.csv")) == comparable(reference[0])
    assert abs(final_val_loss(last.parent) - final_val_loss(reference[1])) <= 1e-6


def test_two_ranks_agree_on_the_step_to_stop_at_and_only_rank_zero_writes(root):
    """torchrun forwards SIGTERM to both ranks; they stop at the first check after it, together."""
    kv = {**TINY, "data_dir": root / "data", "checkpoint_dir": root / "ckpt", "run_name": "ddp", "max_train_samples": 384}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cifarlib.train",
           *[f"{k}={v}" for k, v in kv.items()]]
    history = root / "ckpt" / "ddp" / "history.csv"
    p = subprocess.Popen(cmd, env=pausing(history), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import psutil
    deadline = time.monotonic() + 240
    while not (rank0 := [c for c in psutil.Process(p.pid).children(recursive=True) if c.status() == psutil.STATUS_STOPPED]):
        assert p.poll() is None and time.monotonic() < deadline, "rank 0 did not pause once epoch 1's row was written"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    while not pending(rank0[0].pid, signal.SIGTERM):  # rank 0, paused, holds it until it goes on
        assert p.poll() is None and time.monotonic() < deadline, "torchrun did not forward SIGTERM to rank 0"
        time.sleep(0.01)
    rank0[0].resume()
    out, err = p.communicate(timeout=120)
    assert err.count("interrupted at epoch 2 step ") == 1, err[-3000:]  # said once, by rank 0
    saved = checkpoints.load(history.parent / "last.pt")["resume"]
    # the first check after the signal: in epoch 2, before its first step (while epoch 1 is saved)
    # or a few steps in; where exactly depends on the machine's pace
    assert (saved["next_stage"], saved["next_epoch"]) == (1, 0) and 0 <= saved["step"] <= 6
    out = subprocess.run(cmd + ["resume=True"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run files:") == 1 and out.stdout.count("epoch 3/3 ") == 1
    assert [r["stage"] for r in checkpoints.read_history(history)] == ["head", "top", "top"]


def test_a_non_finite_loss_stops_the_run_and_touches_no_file(root, one_thread):
    stages = [Stage("head", 1, ("head",), (3e-3,)), Stage("all", 2, ("layer4", "head"), (1e30, 1e30))]
    run = train.prepare(tiny(root, "nan", stages=stages))
    gen = train.epochs(run)
    next(gen)
    checkpoints.SAVER.wait()
    before = {f: (run.dir / f).read_bytes() for f in ("best.pt", "last.pt", "history.csv")}
    with pytest.raises(UserError, match=r"NaN or infinite at epoch 2, step \d+, in stage 'all' \(learning rates: "
                                        r"layer4 .*head .*\).*Likely causes: a learning rate too high"):
        next(gen)
    assert {f: (run.dir / f).read_bytes() for f in before} == before
    with pytest.raises(UserError, match="NaN or infinite"):  # the damaged model is not trained on
        next(train.epochs(run))


def test_a_non_finite_validation_loss_is_named_as_such():
    message = str(guard.non_finite_error(3, None, "all", {"head": 0.1}, fp16=False))
    assert message.startswith("the validation loss became NaN or infinite after epoch 3, in stage 'all'")
    assert "That step" not in message and "fp16" not in message
    assert "fp16 overflow" in str(guard.non_finite_error(3, 7, "all", {"head": 0.1}, fp16=True))


def test_out_of_memory_is_one_message_with_the_remedies(root, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "available_memory", lambda device: 10 * 2**20)  # 10 MiB
    run = train.prepare(tiny(root, "oom"))
    real, calls = train.train_steps, []

    def step_out_of_memory(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(train, "train_steps", step_out_of_memory)
    gen = train.epochs(run)
    next(gen)  # the first epoch trains, after the memory warning
    warning = capsys.readouterr().err
    assert "warning: a training step at batch_size=32, image_size=32 needs about" in warning
    assert "batch_size=16 with accum_steps=2 keeps the recipe" in warning
    checkpoints.SAVER.wait()
    saved = (run.dir / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"out of memory on cpu .* during training, at batch_size=32, image_size=32\. "
                                        r"Remedies: batch_size=16 with accum_steps=2 keeps the recipe.*smaller image_size"):
        next(gen)
    assert (run.dir / "last.pt").read_bytes() == saved


NOTEBOOK = ROOT / "notebooks" / "03_train.ipynb"


def notebook_parameters(root: Path, name: str, **extra) -> dict:
    return {**TINY, "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"), "run_name": name, **extra}


def test_a_killed_kernel_leaves_a_run_that_papermill_finishes_with_resume(root, reference, tmp_path, notebook_kernel):
    """The papermill command's kernel is killed mid-run; the same notebook with the same parameters
    and resume=True, through papermill again (in the suite's shared kernel), finishes the run."""
    psutil = pytest.importorskip("psutil", reason="needs psutil to find the kernel process")
    parameters = notebook_parameters(root, "pm-killed", save_every_minutes=0.00001)
    params = [a for k, v in parameters.items() for a in ("-p", k, str(v))]
    cmd = [sys.executable, "-m", "papermill", "--no-progress-bar", "-k", "python3", str(NOTEBOOK), str(tmp_path / "out.ipynb")]
    last = root / "ckpt" / "pm-killed" / "last.pt"
    p = subprocess.Popen(cmd + params, env=pausing(last, "mid-epoch"), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (kernels := [c for c in psutil.Process(p.pid).children(recursive=True) if "ipykernel" in " ".join(c.cmdline())]):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    assert len(kernels) == 1
    stopped(kernels[0].pid)  # the kernel paused itself after a save inside an epoch
    kernels[0].kill()  # the kernel dies: no warning, no handler
    p.communicate(timeout=120)
    assert p.returncode != 0 and checkpoints.load(last)["resume"]["step"] > 0  # the folder is intact
    with notebook_kernel.one_thread():  # as the command's kernel ran (OMP_NUM_THREADS=1)
        notebook_kernel.run(NOTEBOOK, tmp_path / "again.ipynb", **parameters, resume=True)
    assert comparable(checkpoints.read_history(last.parent / "history.csv")) == comparable(reference[0])


def test_interrupting_notebook_03_then_running_its_cell_again_continues(root, reference, notebook_kernel):
    """In the suite's shared kernel, cell by cell, as a user runs it in JupyterLab."""
    import papermill as pm
    from nbclient import NotebookClient
    nb = pm.parameterize.parameterize_notebook(pm.iorw.load_notebook_node(str(NOTEBOOK)),  # as papermill reads it
                                               notebook_parameters(root, "nb-interrupted", save_every_minutes=0.00001))
    client = NotebookClient(nb, km=notebook_kernel.km, timeout=300, allow_errors=True,
                            resources={"metadata": {"path": str(ROOT)}})
    training = next(i for i, c in enumerate(nb.cells) if "train.epochs(run)" in c.source)
    last = root / "ckpt" / "nb-interrupted" / "last.pt"
    notebook_kernel.reset()
    # what JupyterLab's interrupt button does, SIGINT to the kernel process, sent by the kernel
    # itself after its first save inside an epoch
    notebook_kernel.execute(f"import signal, sys; sys.path.insert(0, {str(HOOKS)!r}); import pause_hook; "
                            f"pause_hook.install({str(last)!r}, 'mid-epoch', signal.SIGINT)")
    with notebook_kernel.one_thread(), client.setup_kernel():  # one thread: as the reference ran
        for i, cell in enumerate(nb.cells[:training]):
            client.execute_cell(cell, i)
        try:
            client.execute_cell(nb.cells[training], training)
        finally:
            notebook_kernel.execute("import pause_hook; pause_hook.uninstall()")
        errors = [o for o in nb.cells[training].outputs if o.output_type == "error"]
        assert len(errors) == 1 and errors[0].ename == "Interrupted", nb.cells[training].outputs
        assert "interrupted at epoch " in errors[0].evalue and "running the training cell again continues" in errors[0].evalue
        assert errors[0].traceback == [f"Interrupted: {errors[0].evalue}"]  # one line, no traceback
        client.execute_cell(nb.cells[training], training)  # run the cell again: it goes on
        assert not [o for o in nb.cells[training].outputs if o.output_type == "error"]
    assert comparable(checkpoints.read_history(last.parent / "history.csv")) == comparable(reference[0])
