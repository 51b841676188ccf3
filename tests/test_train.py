"""Staged fine-tuning: configs, stages, schedules, the loop, checkpoints and resume."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from cifarlib.core.errors import UserError
from cifarlib.data import sources
from cifarlib.data.augment import BatchAugment
from cifarlib.model import backbones as model_lib, checkpoints
from cifarlib.training import train
from cifarlib.training.config import make_config, parse_value, scale_epochs, stage_image_size

# device="cpu": these tests mean the CPU (exact resumes, gloo) even on a machine with a GPU
TINY = dict(dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=32,
            max_train_samples=400, max_eval_samples=100, device="cpu")


def tiny_cfg(tmp_path, **kw):
    """A tiny run in `tmp_path`; its synthetic data is written once for the session (as test_budget's)."""
    return make_config(kw.pop("preset", "cpu"), **{**TINY, "data_dir": str(tmp_path.parent / "data"),
                                                    "checkpoint_dir": str(tmp_path / "ckpt"), "run_name": "r", **kw})


def test_epochs_scale_with_largest_remainders():
    assert scale_epochs([10, 15, 75], 100) == [10, 15, 75]
    assert scale_epochs([10, 15, 75], 20) == [2, 3, 15]
    assert scale_epochs([10, 15, 75], 3) == [1, 1, 1]
    for total in range(3, 60):
        parts = scale_epochs([10, 15, 75], total)
        assert sum(parts) == total and min(parts) >= 1
    assert [s.epochs for s in make_config("original", epochs=20).stages] == [2, 3, 15]


def test_the_original_preset_is_the_original_recipe():
    c = make_config("original")
    assert (c.epochs, c.batch_size, c.image_size, c.optimizer, c.momentum, c.weight_decay) == (100, 32, 224, "sgd", 0.9, 5e-4)
    assert (c.patience, c.stop_ends_run, c.augmentation, c.backbone, c.weights) == (10, True, "original", "resnet50", "imagenet")
    assert [(s.epochs, s.groups, s.lr, s.warmup, s.anneal) for s in c.stages] == [
        (10, ("head",), (0.01,), 0.3, "cos"),
        (15, ("layer3", "layer4", "head"), (5e-4, 1e-3, 5e-3), 0.3, "cos"),
        (75, ("layer1", "layer2", "layer3", "layer4", "head"), (5e-5, 1e-4, 3e-4, 8e-4, 2e-3), 0.3, "cos")]


def test_original_schedule_matches_the_recipe_step_for_step():
    cfg = make_config("original")
    net = model_lib.build_model("resnet18", 100, "none")
    groups = model_lib.layer_groups(net)
    for stage in cfg.stages:
        opt = train.make_optimizer(cfg, train.apply_stage(net, groups, stage), fused=False)
        assert opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 5e-4
        steps = 7 * stage.epochs  # any steps per epoch
        sched = train.make_schedule(cfg, opt, stage, steps)
        up = 0.3 * steps - 1  # where OneCycleLR ends the warm-up (a fractional step)
        for t in range(steps):
            for g, peak in zip(opt.param_groups, stage.lr):
                lo, end = peak / 25, peak / 25 / 1e4
                if t <= up:
                    want = lo + (peak - lo) * (1 - math.cos(math.pi * t / up)) / 2
                    mom = 0.95 - 0.1 * (1 - math.cos(math.pi * t / up)) / 2
                else:
                    want = end + (peak - end) * (1 + math.cos(math.pi * (t - up) / (steps - 1 - up))) / 2
                    mom = 0.85 + 0.1 * (1 - math.cos(math.pi * (t - up) / (steps - 1 - up))) / 2
                assert g["lr"] == pytest.approx(want, rel=1e-6) and g["momentum"] == pytest.approx(mom, rel=1e-6)
            opt.step()
            sched.step() if t + 1 < steps else None


def test_a_stage_trains_exactly_its_groups_with_its_rates():
    net = model_lib.build_model("resnet18", 100, "none")
    groups = model_lib.layer_groups(net)
    stage = make_config("original").stages[1]
    pg = train.apply_stage(net, groups, stage)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n in groups["layer3"] + groups["layer4"] + groups["head"]}
    assert [(g["name"], g["lr"], len(g["params"])) for g in pg] == [
        ("layer3", 5e-4, len(groups["layer3"])), ("layer4", 1e-3, len(groups["layer4"])), ("head", 5e-3, 2)]
    assert all(n.startswith(("layer3.", "layer4.", "fc.")) for n in trainable)


def test_frozen_batchnorm_keeps_its_statistics():
    net = model_lib.build_model("resnet18", 100, "none")
    groups = model_lib.layer_groups(net)
    train.apply_stage(net, groups, make_config("original").stages[0])  # head only
    train.train_mode(net)
    before = net.bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(net.bn1.running_mean, before) and not net.bn1.training and net.training
    train.apply_stage(net, groups, make_config("fast").stages[1])  # everything
    train.train_mode(net)
    net(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(net.bn1.running_mean, before) and net.bn1.training
    train.apply_stage(net, groups, make_config("original").stages[0])  # head only again
    train.train_mode(net, "train")  # the original's rule: a plain model.train()
    moved = net.bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(net.bn1.running_mean, moved) and net.bn1.training
    assert make_config("original").frozen_bn == "train" and make_config("cpu").frozen_bn == "eval"


def test_the_new_head_starts_at_zero_unless_asked_otherwise(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    zero = model_lib.build_model("resnet18", 10, "none").eval()
    assert torch.equal(zero(x), torch.zeros(2, 10))  # uniform first predictions
    default = model_lib.build_model("resnet18", 10, "none", head_init="default")
    assert default.fc.weight.abs().sum() > 0
    torch.save(default.state_dict(), tmp_path / "w.pt")
    loaded = model_lib.build_model("resnet18", 10, str(tmp_path / "w.pt"))  # a head that fits is kept
    assert torch.equal(loaded.fc.weight, default.fc.weight)
    assert make_config("original").head_init == "default" and make_config("cpu").head_init == "zero"


@pytest.mark.parametrize("bad,msg", [
    (dict(epoch=3), "unknown setting.*epoch"), (dict(epochs="3"), "epochs must be int"),
    (dict(epochs=2), "fewer than the preset's 3 stages"), (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(stages=[dict(name="x", share=1, groups=(), lr=())]), "trains nothing"),
    (dict(stages=[dict(name="x", share=1, groups=("head", "layer4"), lr=(0.1,))]), "1 learning rate.*2 group"),
    (dict(stages=[dict(name="x", share=1, groups=("neck",), lr=(0.1,))]), "unknown layer group"),
    (dict(stages=[dict(name="x", share=1, groups=("head",), lr=(0.1,), image_size=-1)]), "image_size 0"),
    (dict(stages=[dict(name="x", share=1, groups=("head",), lr=(0.1,), size=64)]), "unknown or missing field"),
    (dict(stages='[{"name": "x", "share": 1,'), "stages must be a JSON list"),
    (dict(frozen_bn="frozen"), "frozen_bn must be 'eval'.*or 'train'"),
    (dict(head_init="random"), "head_init must be 'zero'"),
])
def test_invalid_configs_fail_at_once(bad, msg):
    with pytest.raises(UserError, match=msg):
        make_config("original", **bad)
    with pytest.raises(UserError, match="unknown preset"):
        make_config("turbo")


def test_stages_from_the_command_line_and_their_image_sizes():
    text = '[{"name": "head", "share": 1, "groups": ["head"], "lr": [0.003], "image_size": 64}, ' \
           '{"name": "all", "share": 2, "groups": ["layer4", "head"], "lr": [0.001, 0.01]}]'
    cfg = make_config("cpu", stages=parse_value(text), epochs=3, image_size=96)
    assert [(s.name, s.epochs, s.groups, s.lr) for s in cfg.stages] == [
        ("head", 1, ("head",), (0.003,)), ("all", 2, ("layer4", "head"), (0.001, 0.01))]
    assert [stage_image_size(cfg, s) for s in cfg.stages] == [64, 96]
    small = make_config("cpu", image_size=48)  # the run's size caps a stage's own
    assert [stage_image_size(small, s) for s in small.stages] == [48, 48]


def test_values_are_read_as_papermill_reads_them():
    assert [parse_value(v) for v in ("True", "None", "3", "0.5", "1e-3", "resnet50")] == [True, None, 3, 0.5, 1e-3, "resnet50"]


def test_loss_falls_and_a_run_writes_self_describing_files(tmp_path):
    run = train.prepare(tiny_cfg(tmp_path, epochs=3, max_train_samples=1000))
    rows = list(train.epochs(run))
    assert [r["stage"] for r in rows] == ["head", "top", "top"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    files = sorted(p.name for p in run.dir.iterdir())
    assert files == ["best.pt", "config.json", "history.csv", "last.pt", "loss_curves.png"]
    ckpt = checkpoints.load(run.dir / "best.pt")  # weights_only=True inside
    assert ckpt["backbone"] == "test_resnet" and len(ckpt["classes"]) == 100 and ckpt["classes"][0] == "apple"
    assert ckpt["mean"] == [0.5, 0.5, 0.5] and ckpt["image_size"] == 32 and ckpt["config"]["preset"] == "cpu"
    assert len(ckpt["history"]) >= 1 and "resume" not in ckpt and "resume" in checkpoints.load(run.dir / "last.pt")
    assert ckpt["metrics"] == min(rows, key=lambda r: r["val_loss"])
    fresh = model_lib.build_model("test_resnet", 100, "none").eval()
    fresh.load_state_dict(checkpoints.load(run.dir / "last.pt")["model"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fresh(x), run.model.eval()(x))
    assert len(checkpoints.read_history(run.dir / "history.csv")) == 3


def test_each_stage_trains_and_validates_at_its_own_size(tmp_path, monkeypatch):
    from cifarlib.training import loop
    trained, validated = [], []
    real_augment, real_logits = BatchAugment.__call__, loop.logits

    def augment(self, *a, **k):
        out = real_augment(self, *a, **k)
        trained.append(out[0].shape[-1])
        return out

    def logits(model, x, size, *a, **k):
        validated.append(size)
        return real_logits(model, x, size, *a, **k)
    monkeypatch.setattr(BatchAugment, "__call__", augment)
    monkeypatch.setattr(loop, "logits", logits)
    run = train.prepare(tiny_cfg(tmp_path, epochs=2, max_train_samples=64, max_eval_samples=32, image_size=40))
    stages = [(s.name, s.image_size) for s in run.cfg.stages]
    assert stages == [("head", 64), ("top", 0)]  # the preset's head size, capped at 40 below
    run.cfg = dataclasses.replace(run.cfg, stages=(dataclasses.replace(run.cfg.stages[0], image_size=24), run.cfg.stages[1]))
    sizes = []
    for _ in train.epochs(run):
        checkpoints.SAVER.wait()  # last.pt is written in the background
        sizes.append((run.aug.size, checkpoints.load(run.dir / "last.pt")["image_size"]))
    assert sizes == [(24, 24), (40, 40)]
    assert trained == sorted(trained) and set(trained) == {24, 40} and set(validated) == {24, 40}


def test_existing_runs_are_never_overwritten_silently(tmp_path):
    (tmp_path / "ckpt" / "r").mkdir(parents=True)
    (tmp_path / "ckpt" / "r" / "history.csv").write_text("x")
    with pytest.raises(UserError, match="already exists.*resume=True.*overwrite=True"):
        train.prepare(tiny_cfg(tmp_path))
    with pytest.raises(UserError, match="cannot resume.*last.pt does not exist"):
        train.prepare(tiny_cfg(tmp_path, resume=True))


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save({"format": 1, "model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
    real = os.fdopen
    monkeypatch.setattr(checkpoints.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(UserError, match="no space left.*untouched"):
        checkpoints.save({"format": 1, "model": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoints_are_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    checkpoints.save({"format": 1, "model": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoints.load(path)
    with pytest.raises(UserError, match="does not exist"):
        checkpoints.load(tmp_path / "nope.pt")


def test_local_weights_file_head_is_dropped_other_mismatches_listed(tmp_path, capsys):
    imagenet_like = model_lib.build_model("resnet18", 1000, "none")
    torch.save(imagenet_like.state_dict(), tmp_path / "r18.pt")
    net = model_lib.build_model("resnet18", 100, str(tmp_path / "r18.pt"))
    assert "dropped the classifier head" in capsys.readouterr().out
    assert torch.equal(net.conv1.weight, imagenet_like.conv1.weight) and net.fc.out_features == 100
    sd = imagenet_like.state_dict()
    sd["extra.weight"] = torch.ones(1)
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"missing: layer1.0.conv1.weight; unexpected: extra.weight"):
        model_lib.build_model("resnet18", 100, str(tmp_path / "bad.pt"))


def test_offline_imagenet_weights_are_one_clear_error(tmp_path, monkeypatch):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # nothing cached
    monkeypatch.setattr(sources, "unreachable", lambda host, timeout: f"cannot resolve {host}")
    try:
        with pytest.raises(UserError, match=r"ImageNet weights of resnet18 are not cached.*weights=<path.*weights=\"none\""):
            model_lib.build_model("resnet18", 100, "imagenet")
    finally:
        torch.hub.set_dir(before)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0", "vit_b_16", "vit_tiny_patch16_224", "efficientnet_b0.ra_in1k"])
def test_every_backbone_maps_onto_six_contiguous_groups(backbone):
    if "." in backbone:
        backbone = backbone.split(".")[0]  # timm's efficientnet_b0 (torchvision's has the same name)
        import timm
        net = timm.create_model(backbone, num_classes=100)
    else:
        net = model_lib.build_model(backbone, 100, "none")
    groups = model_lib.layer_groups(net)
    names = [n for n, _ in net.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)
    assert all(groups[g] for g in model_lib.GROUPS), {g: len(v) for g, v in groups.items()}
    order = {n: i for i, n in enumerate(names)}
    for a, b in zip(model_lib.GROUPS, model_lib.GROUPS[1:-1]):
        assert max(order[n] for n in groups[a]) < min(order[n] for n in groups[b])
    assert all(isinstance(net.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Linear) for n in groups["head"])


def test_cli_help_and_bad_settings(capsys):
    """A bad setting in a real process (the entry point, exit status 2, no traceback); --help
    through the same `main` in this process."""
    bad = subprocess.run([sys.executable, "-m", "cifarlib.train", "epoch=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown setting(s) epoch" in bad.stderr and "Traceback" not in bad.stderr
    train.main(["--help"])
    out = capsys.readouterr().out
    assert "epochs=100" in out and "max_train_samples=None" in out


def test_offline_timm_weights_fail_fast_with_the_same_remedies(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.setattr(sources, "unreachable", lambda host, timeout: f"cannot resolve {host}")
    with pytest.raises(UserError, match=r"resnet18.a1_in1k are not cached.*weights=\"none\""):
        model_lib.build_model("resnet18.a1_in1k", 100, "imagenet")


def test_training_needs_a_validation_split_and_rejects_unsupported_backbones():
    with pytest.raises(UserError, match="val_fraction must be above 0"):
        make_config("cpu", val_fraction=0.0)
    with pytest.raises(UserError, match="googlenet is not supported"):
        model_lib.build_model("googlenet", 100, "none")


@pytest.mark.parametrize("ends_run,stages_seen", [(True, ["head", "head"]), (False, ["head", "head", "top", "top"])])
def test_early_stopping_ends_the_run_or_only_the_stage(tmp_path, monkeypatch, ends_run, stages_seen):
    losses = iter(range(1, 100))  # validation loss that only ever gets worse
    monkeypatch.setattr(train, "validate", lambda run, model: (float(next(losses)), 0.0))
    run = train.prepare(tiny_cfg(tmp_path, epochs=6, patience=1, stop_ends_run=ends_run))
    assert [s.epochs for s in run.cfg.stages] == [2, 4]
    assert [r["stage"] for r in train.epochs(run)] == stages_seen


def test_resume_at_a_stage_boundary_matches_an_uninterrupted_run(tmp_path):
    def rows(run, stop_after=None):
        out = []
        for row in train.epochs(run):
            out.append({k: v for k, v in row.items() if k not in ("seconds", "images_per_s")})
            if len(out) == stop_after:
                break
        return out
    whole = rows(train.prepare(tiny_cfg(tmp_path, epochs=3, run_name="whole")))
    first = rows(train.prepare(tiny_cfg(tmp_path, epochs=3, run_name="cut")), stop_after=1)  # the head stage
    rest = rows(train.prepare(tiny_cfg(tmp_path, epochs=3, run_name="cut", resume=True)))
    assert [r["stage"] for r in first + rest] == ["head", "top", "top"]
    assert first + rest == whole
