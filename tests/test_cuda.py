"""The few things only a CUDA GPU runs, checked where one is present (skipped elsewhere): the
device plan's kernels there, a CPU-saved run continued on CUDA, an NCCL group's collectives,
and the host syncs of an epoch. Everything else of the GPU's plan runs on the CPU in
tests/test_plan.py. `benchmarks/gpu_check.sh` runs this file first, within a minute.
"""

import inspect
import math
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from interrupted import stopped_at_batch

from cifarlib.core import runtime
from cifarlib.model import checkpoints
from cifarlib.training import loop, train
from cifarlib.training.config import Stage, make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(preset="cpu", dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=16,
            max_train_samples=320, max_eval_samples=64, epochs=2)


def tiny(root: Path, name: str, **kw):
    return make_config(**{**TINY, "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"),
                          "run_name": name, **kw})


@pytest.mark.parametrize("optimizer,precision", [("adamw", "bf16"), ("sgd", "bf16"), ("adamw", "fp16")])
def test_a_step_of_each_fused_optimizer_in_each_precision(optimizer, precision, tmp_path):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run = train.prepare(tiny(tmp_path, f"{optimizer}-{precision}", device="cuda", precision=precision, fused=True,
                             optimizer=optimizer, max_train_samples=32))
    stage = Stage("all", 1, ("layer4", "head"), (1e-3, 1e-2))
    opt = train.make_optimizer(run.cfg, train.apply_stage(run.model, run.groups, stage), fused=True)
    st = train.StageRun(0, stage, run.model, opt, train.make_schedule(run.cfg, opt, stage, 2), run.plan.scaler())
    before = run.model.get_submodule("fc").weight.detach().clone()
    assert math.isfinite(train.train_epoch(run, st, epoch=0))
    assert st.scaler.is_enabled() == (precision == "fp16") and opt.param_groups[0]["fused"]
    assert not torch.equal(before, run.model.get_submodule("fc").weight)


def test_a_run_saved_on_the_cpu_continues_on_cuda(tmp_path, monkeypatch):
    stopped_at_batch(tiny(tmp_path, "moved", device="cpu"), 20 + 3)  # batch 3 of epoch 2
    run = train.prepare(tiny(tmp_path, "moved", device="cuda", resume=True))
    assert run.plan.device.type == "cuda" and run.plan.fused
    rows = list(train.epochs(run))
    assert len(rows) == 1 and math.isfinite(rows[0]["val_loss"])
    assert all(g["fused"] for g in run.stage.opt.param_groups)
    assert {s["step"].device.type for s in run.stage.opt.state.values()} == {"cuda"}  # where fused AdamW reads them


def test_a_run_saved_fused_on_cuda_resumed_unfused_keeps_its_counters_on_the_host(tmp_path, monkeypatch):
    """Unfused AdamW reads each counter as a number: on the GPU, that is a wait per parameter and
    step. Resumed unfused, the counters are on the CPU and an epoch waits only at its checks."""
    stopped_at_batch(tiny(tmp_path, "unfused", device="cuda", fused=True), 20 + 3)  # batch 3 of epoch 2
    run = train.prepare(tiny(tmp_path, "unfused", device="cuda", fused=False, resume=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            rows = list(train.epochs(run))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(rows) == 1 and {s["step"].device.type for s in run.stage.opt.state.values()} == {"cpu"}
    in_adamw = [w for w in caught if "synchroniz" in str(w.message).lower() and "adamw" in w.filename]
    assert not in_adamw, [f"{Path(w.filename).name}:{w.lineno}" for w in in_adamw]


def test_an_nccl_group_stops_before_an_epochs_first_step(tmp_path, monkeypatch):
    """A stop that comes during validation is acted on before the next epoch's first step, where
    the ranks agree on it with a collective of host values: NCCL takes only GPU tensors."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        real = train.validate
        monkeypatch.setattr(train, "validate", lambda r, m: (os.kill(os.getpid(), signal.SIGTERM), real(r, m))[1])
        run = train.prepare(tiny(tmp_path, "nccl", device="cuda"))
        with pytest.raises(train.guard.Interrupted, match="interrupted at epoch 2 step 0"):
            list(train.epochs(run))
        assert checkpoints.load(run.dir / "last.pt")["resume"]["step"] == 0
    finally:
        dist.destroy_process_group()


def test_an_epoch_waits_for_the_gpu_only_at_its_scheduled_checks(tmp_path):
    """60 optimizer steps under the CUDA plan (a check every 50): every host sync outside the
    checks and the epoch's loss is counted, by its line; there should be none."""
    run = train.prepare(tiny(tmp_path, "syncs", device="cuda", batch_size=8, max_train_samples=480))
    stage = Stage("all", 1, ("layer3", "layer4", "head"), (1e-4, 1e-3, 1e-2))
    opt = train.make_optimizer(run.cfg, train.apply_stage(run.model, run.groups, stage), run.plan.fused)
    st = train.StageRun(0, stage, run.model, opt, train.make_schedule(run.cfg, opt, stage, 200), run.plan.scaler())
    train.train_epoch(run, st, epoch=0)  # warm-up
    torch.cuda.synchronize()
    allowed = [loop.scheduled_check, runtime.sum_over_ranks, runtime.all_reduce]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train_epoch(run, st, epoch=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def scheduled(w) -> bool:
        for fn in allowed:
            lines, start = inspect.getsourcelines(fn)
            if Path(w.filename).resolve() == Path(inspect.getsourcefile(fn)).resolve() and start <= w.lineno < start + len(lines):
                return True
        return False
    warned = [w for w in caught if "synchroniz" in str(w.message).lower()]
    others = [f"{Path(w.filename).name}:{w.lineno}" for w in warned if not scheduled(w)]
    assert len(train.train_loader(run)) == 60 and not others, others


def test_pictures_in_pinned_host_memory_come_to_the_gpu_as_the_same_batches(tmp_path):
    """data_on=host on CUDA: the pictures in plain host memory, batches gathered by the background
    thread into pinned buffers and copied without a wait; the batches are those of the pictures
    on the device."""
    from cifarlib.data.datasets import Batches, load_cifar
    kw = dict(device="cuda", max_train_samples=300, max_eval_samples=10)
    on_host = load_cifar("synthetic", tmp_path, data_on="host", **kw)
    on_device = load_cifar("synthetic", tmp_path, data_on="device", **kw)
    assert not on_host.train.images.is_cuda and on_device.train.images.is_cuda
    for (x, y), (x2, y2) in zip(Batches(on_host.train, 64, shuffle=True, ahead=4).epoch(1),
                                Batches(on_device.train, 64, shuffle=True).epoch(1)):
        assert x.is_cuda and torch.equal(x, x2) and torch.equal(y, y2)
    assert runtime.host_empty((2, 3), torch.device("cuda")).is_pinned()
