"""The GPU path, checked on the CPU: no host waits inside a training step, the process group's
setup, DDP's details, the gradient scaler and the background saver. `benchmarks/gpu_check.sh`
measures the same things on a real GPU (its --smoke mode runs in test_benchmarks.py)."""

import json
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from cifarlib.core import runtime
from cifarlib.core.errors import UserError
from cifarlib.data.augment import BatchAugment, make_policy
from cifarlib.data.datasets import Split
from cifarlib.model import GROUPS, build_model, checkpoints, layer_groups
from cifarlib.training import loop, train
from cifarlib.training.config import Stage, make_config
from cifarlib.training.run import Run, StageRun


def test_a_training_epoch_reads_nothing_back_from_the_device(monkeypatch):
    """On the meta device tensors have no values, so any host read of one inside the loop (an
    `.item()`, a tensor in an `if`, a small copy back) raises. Only the scheduled checks read.
    Nor does the host wait on a copy to the device, the entry of `train_steps` included (its
    running loss was once made by `torch.tensor(x, device=...)`, a copy the host waits for)."""
    plan = runtime.resolve_plan("meta", check_every=50)  # a device that is not the host: checks every 50 steps
    cfg = make_config("cpu", weights="none", backbone="resnet18", image_size=32, batch_size=8, accum_steps=2)
    net = build_model("resnet18", 10, "none").to(plan.device)
    groups = layer_groups(net)
    stage = Stage("all", 1, GROUPS, (1e-3,) * 6)
    opt = train.make_optimizer(cfg, train.apply_stage(net, groups, stage), plan.fused)
    st = StageRun(0, stage, net, opt, train.make_schedule(cfg, opt, stage, 4), plan.scaler())
    split = Split(torch.zeros(64, 3, 32, 32, dtype=torch.uint8, device=plan.device),
                  torch.zeros(64, dtype=torch.long, device=plan.device))
    run = Run(cfg, Path("."), plan, None, split, split, net, groups,
              BatchAugment(make_policy("original"), 32, (0.5,) * 3, (0.5,) * 3, 10))
    checks = []  # the scheduled checks: the loop's only reads, every 50 optimizer steps and at the epoch's end
    monkeypatch.setattr(loop, "scheduled_check", lambda *a: checks.append(a) or loop.Check(False, None, False, 0.0))
    monkeypatch.setattr(runtime, "sum_over_ranks", lambda *values: [0.0] * len(values))
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    train.train_epoch(run, st, epoch=0)  # the first epoch fills the augmentation's caches of constants
    checks.clear()
    with HostToDevice() as copies:
        train.train_epoch(run, st, epoch=1)
    assert len(steps) == 8 and len(checks) == 1  # 8 batches an epoch, 2 per optimizer step; one check
    assert not copies.seen, copies.seen  # and nothing copied to the device that the host waits for


class HostToDevice(TorchFunctionMode):
    """Records every copy from the host to another device that makes the host wait: a tensor made
    from host data on the device (`torch.tensor(x, device=...)`, `new_tensor`), or `.to` and
    `copy_` from host memory, unless from pinned memory and non-blocking. The copies made by
    `runtime.to_device` are its business: on CUDA it copies from pinned memory without waiting
    (`meta` has no pinned memory to show it). Each as the line of cifarlib that made it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            frames = [f for f in traceback.extract_stack() if "/cifarlib/" in f.filename]
            if not any(f.name == "to_device" and f.filename.endswith("runtime.py") for f in frames):
                self.seen.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames
                                 else func.__name__)
        return func(*args, **kwargs)

    @staticmethod
    def _waits(func, args, kwargs) -> bool:
        off_host = lambda d: d is not None and torch.device(d).type != "cpu"  # noqa: E731
        if func in (torch.tensor, torch.as_tensor):
            return off_host(kwargs.get("device"))
        if func is torch.Tensor.new_tensor:
            return off_host(kwargs.get("device", args[0].device))
        if func is torch.Tensor.to:
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            return args[0].device.type == "cpu" and off_host(device) and not (non_blocking and args[0].is_pinned())
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            return src.device.type == "cpu" and off_host(dst.device) and not (
                (kwargs.get("non_blocking") or args[2:3] == (True,)) and src.is_pinned())
        return False


def test_the_copy_counter_sees_a_blocking_copy_and_not_a_tensor_made_on_the_device():
    with HostToDevice() as copies:
        torch.tensor(1.0, device="meta")
        torch.zeros(3).to("meta")
        torch.empty(3, device="meta").copy_(torch.zeros(3))
        torch.full((), 1.0, device="meta")
        torch.zeros(3).to(torch.float64)
    assert len(copies.seen) == 3, copies.seen


def test_fp16_comes_with_fused_kernels_unless_asked_otherwise_and_then_says_it_waits():
    """An unfused optimizer's gradient scaler reads the overflow flag back at every step."""
    assert runtime.resolve_plan("cpu", precision="fp16").fused  # the plan's own choice
    assert not runtime.resolve_plan("cpu", precision="fp16", fused=False).fused  # allowed when asked
    forced = runtime.DevicePlan(torch.device("cuda", 0), "fp16", False, True, 50)  # a CUDA plan, made without CUDA
    assert forced.scaler_waits and forced.describe().endswith(
        "; the unfused optimizer's gradient scaler waits for the device at every step (fused=True avoids it)")
    assert not runtime.DevicePlan(torch.device("cuda", 0), "fp16", True, True, 50).scaler_waits
    assert not runtime.DevicePlan(torch.device("cpu"), "fp16", False, True, 1).scaler_waits  # the host does not wait


@pytest.fixture
def fake_group(monkeypatch):
    """torchrun's environment for rank 1 of 2, with init_process_group recorded instead of run."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init_process_group(backend, timeout=None, device_id=None):  # the signature of torch >= 2.3
        calls.append(("init", backend, {"timeout": timeout, "device_id": device_id}))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_the_process_group_follows_the_device(fake_group, monkeypatch):
    runtime.setup_distributed("cpu")  # gloo, even with CUDA present
    assert fake_group == [("init", "gloo", {"timeout": runtime.COLLECTIVE_TIMEOUT, "device_id": None})]
    fake_group.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runtime.setup_distributed("auto")
    (_, index), (_, backend, kw) = fake_group  # the GPU is set before the group starts
    assert index == 1 and backend == "nccl" and kw["device_id"] == torch.device("cuda", 1)


def test_a_local_rank_without_its_gpu_is_a_clear_error(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"LOCAL_RANK=1, but this machine has 1 CUDA device.*--nproc_per_node=1"):
        runtime.setup_distributed("cuda")
    assert fake_group == []


def test_an_empty_scaler_state_loads_into_an_enabled_scaler():
    """Resuming under fp16 a run saved without it (a disabled scaler's `{}`)."""
    scaler = runtime.resolve_plan("cpu", precision="fp16").scaler()
    assert scaler.is_enabled() and not runtime.resolve_plan("cpu", precision="bf16").scaler().is_enabled()
    train.load_scaler_state(scaler, {})
    saved = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10).state_dict()
    train.load_scaler_state(scaler, saved)
    assert scaler.state_dict()["scale"] == 2.0 ** 10


def test_cudnn_picks_its_kernels_once_for_fixed_shapes(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.resolve_plan("cpu").tune()
    assert not torch.backends.cudnn.benchmark
    runtime.DevicePlan(torch.device("cuda", 0), "bf16", True, True, 50).tune()  # a CUDA plan, made without CUDA
    assert torch.backends.cudnn.benchmark


def test_the_saver_writes_in_order_and_reports_errors_once():
    saver, log, gate = checkpoints.Saver(), [], threading.Event()
    saver.submit(lambda: (time.sleep(0.3), log.append("first")))
    saver.submit(lambda: (gate.wait(60), log.append("second")))  # returns once the first is written
    assert log == ["first"]  # (the second waits for the gate: it could otherwise be written already)
    gate.set()
    saver.wait()
    assert log == ["first", "second"]
    saver.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        saver.wait()
    saver.wait()  # reported once


def test_a_process_waits_for_its_last_save_before_exiting(tmp_path):
    script = ("import time\nfrom cifarlib.model import checkpoints\n"
              f"checkpoints.SAVER.submit(lambda: (time.sleep(1), open({str(tmp_path / 'saved')!r}, 'w').write('done')))\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / "saved").read_text() == "done"


def _worker(rank: int, world: int, root: str) -> None:
    """Rank 1 is slow to reach its run folder; the run accumulates gradients over 4 micro-batches;
    then a run with fewer validation images than ranks is refused."""
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    out: dict = {}
    if rank == 1:
        real = checkpoints.runtime.resolve_path
        checkpoints.runtime.resolve_path = lambda p: (time.sleep(1.5), real(p))[1]
    tiny = dict(dataset="synthetic", weights="none", backbone="resnet18", image_size=32, batch_size=8, device="cpu",
                data_dir=f"{root}/data", checkpoint_dir=f"{root}/ckpt", max_train_samples=128, max_eval_samples=16)
    try:
        run = train.prepare(make_config("cpu", run_name="race", accum_steps=4, **tiny))
        out["folder"] = str(run.dir)
    except UserError as e:
        out["folder_error"] = str(e)
    if rank == 1:
        checkpoints.runtime.resolve_path = real
    both = torch.tensor(float("folder" in out))
    dist.all_reduce(both, op=dist.ReduceOp.MIN)  # train only if both ranks got the folder
    if both.item():
        calls = []

        class CountingDDP(torch.nn.parallel.DistributedDataParallel):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                def hook(state, bucket):
                    calls.append(bucket.index())
                    return default_hooks.allreduce_hook(state, bucket)
                self.register_comm_hook(None, hook)
        torch.nn.parallel.DistributedDataParallel = CountingDDP  # what loop.stage_model wraps the model in
        steps = len(train.train_loader(run))
        next(train.epochs(run))
        out["micro_batches"], out["all_reduces"] = steps, calls.count(0)
    try:
        train.prepare(make_config("cpu", run_name="few", **{**tiny, "max_eval_samples": 1}))
    except UserError as e:
        out["few_error"] = str(e)
    Path(f"{root}/rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_slow_rank_agrees_with_rank_zero_on_the_run_folder(two_ranks):
    assert "folder_error" not in two_ranks[1], two_ranks[1]
    assert two_ranks[0]["folder"] == two_ranks[1]["folder"]


def test_accumulated_micro_batches_are_all_reduced_once_per_optimizer_step(two_ranks):
    for r in two_ranks:
        assert (r["micro_batches"], r["all_reduces"]) == (8, 2)


def test_a_rank_without_validation_images_is_refused_not_left_to_hang(two_ranks):
    for r in two_ranks:
        assert "validation split has 1 image(s) for 2 processes" in r["few_error"] and "max_eval_samples" in r["few_error"]


def test_evaluation_and_prediction_follow_the_device_plan(monkeypatch, trained_checkpoint):
    """They run with the device's own plan (on CUDA: bf16 autocast and channels_last), here a CPU
    plan with those choices standing in for it."""
    from cifarlib.data.synthetic import make_images
    from cifarlib.model.inference import predict_split
    from cifarlib.serving.predict import Predictor
    gpu_like = runtime.DevicePlan(torch.device("cpu"), "bf16", False, True, 50)
    monkeypatch.setattr(runtime, "auto_plan", lambda device: gpu_like)
    seen = []
    predictor = Predictor.from_checkpoint(trained_checkpoint, device="cpu")
    assert predictor.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    predictor.model.conv1.register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"))))
    images = make_images(torch.arange(3), seed=1)
    predictor.predict([img.permute(1, 2, 0).numpy() for img in images])
    predict_split(predictor.model, Split(images, torch.arange(3)), 32, predictor.mean, predictor.std)
    assert seen == [(True, True), (True, True)]
