"""Evaluation metrics, hand-checked, and evaluation of checkpoints the trainer wrote."""

import json
import math

import pytest
import torch

from cifarlib.core.errors import UserError
from cifarlib.data import synthetic
from cifarlib.data.datasets import Split
from cifarlib.model import build_model, checkpoints, inference
from cifarlib.evaluation import evaluate

# 4 samples, 3 classes: predictions 0, 2, 2, 1; truths 0, 1, 2, 1
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]])
LABELS = torch.tensor([0, 1, 2, 1])


def test_metrics_match_hand_computed_values():
    m = evaluate.summarise(PROBS, LABELS, ["a", "b", "c"], None, None)
    assert m["top1"] == pytest.approx(3 / 4)
    assert evaluate.topk_accuracy(PROBS, LABELS, 2) == pytest.approx(4 / 4)  # sample 2's truth is 2nd
    assert m["top5"] == 1.0  # k above the class count means every class
    assert m["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.6) + math.log(0.5)) / 4, rel=1e-5)
    assert m["per_class"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 1.0})
    assert m["most_confused"] == [{"true": "b", "predicted": "c", "count": 1}]
    assert evaluate.confusion(LABELS, PROBS.argmax(1), 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert "superclass_top1" not in m


def test_superclass_accuracy_maps_fine_predictions():
    f2c = torch.tensor([0, 1, 1])  # b and c share a superclass
    m = evaluate.summarise(PROBS, LABELS, ["a", "b", "c"], f2c, ["x", "y"])
    assert m["superclass_top1"] == 1.0  # the b->c mistake stays inside superclass y
    assert m["superclass_confusion"] == [[1, 0], [0, 3]]


def test_ece_of_a_calibrated_toy_is_zero_and_of_an_overconfident_one_is_not():
    n = 1000
    probs = torch.full((n, 2), 0.3)
    probs[:, 0] = 0.7
    labels = torch.ones(n, dtype=torch.long)
    labels[:700] = 0  # right 70% of the time at confidence 0.7
    ece, bins = evaluate.calibration(probs, labels)
    assert ece == pytest.approx(0, abs=1e-6) and len(bins) == 1 and bins[0]["count"] == n
    labels[:] = 1  # confident 0.7 and always wrong
    assert evaluate.calibration(probs, labels)[0] == pytest.approx(0.7, abs=1e-6)


def test_flip_tta_changes_nothing_on_symmetric_images():
    net = build_model("resnet18", 10, "none", head_init="default").eval()  # a zero head predicts the same for all
    half = torch.randint(0, 256, (6, 3, 32, 16), dtype=torch.uint8)
    images = torch.cat([half, half.flip(-1)], -1)  # mirror-symmetric
    split = Split(images, torch.arange(6))
    args = (net, split, 32, (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(inference.predict_split(*args), inference.predict_split(*args, flip=True), atol=1e-5)
    asym = Split(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6))
    a = (net, asym, 32, (0.5,) * 3, (0.5,) * 3)
    assert not torch.allclose(inference.predict_split(*a), inference.predict_split(*a, flip=True), atol=1e-5)


def test_a_trained_checkpoint_is_evaluated_and_metrics_json_written(trained_checkpoint):
    data_dir = trained_checkpoint.parents[2] / "data"
    ev = evaluate.evaluate_checkpoint(trained_checkpoint, data_dir=str(data_dir), tta=True, device="cpu")
    saved = json.loads((trained_checkpoint.parent / "metrics.json").read_text())
    for key in ("top1", "top5", "loss", "superclass_top1", "ece", "tta_top1", "checkpoint", "split", "samples", "date"):
        assert key in saved, key
    assert saved["split"] == "test" and saved["samples"] == 1000 == len(ev.labels)
    assert 0 <= saved["top1"] <= saved["top5"] <= 1 and saved["top1"] <= saved["superclass_top1"]
    assert saved["tta"]["gain"] == pytest.approx(saved["tta_top1"] - saved["top1"])
    assert ev.probs.shape == (1000, 100)


def test_cifar10_checkpoints_skip_the_superclass_parts(tmp_path):
    synthetic.write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    net = build_model("resnet18", 10, "none")
    ckpt = {"format": 1, "backbone": "resnet18", "dataset": "cifar10", "classes": [str(i) for i in range(10)],
            "superclasses": None, "fine_to_coarse": None, "mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32,
            "config": {"val_fraction": 0.1, "seed": 0}, "model": net.state_dict(), "history": []}
    (tmp_path / "run").mkdir()
    checkpoints.save(ckpt, tmp_path / "run" / "best.pt")
    ev = evaluate.evaluate_checkpoint(tmp_path / "run" / "best.pt", data_dir=str(tmp_path / "data"),
                                      verify_checksums=False, device="cpu")
    assert "superclass_top1" not in ev.metrics and "superclass_confusion" not in ev.metrics
    assert ev.metrics["samples"] == 50


def test_bad_split_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="split must be"):
        evaluate.evaluate_checkpoint(tmp_path / "x.pt", split="train")
    with pytest.raises(UserError, match="no best.pt under"):
        evaluate.newest_checkpoint(str(tmp_path))
