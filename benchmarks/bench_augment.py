"""Augmentation throughput: cifarlib's batch augmentation against the original per-sample chain.

Both produce 224x224 normalised model inputs with Mixup/CutMix targets from the same 32x32
images, in the same run, on the same machine:

- ours: uint8 images resident on --device, `cifarlib.data.datasets.Batches` + `BatchAugment` with the
  `original` policy (every operation on);
- original: PIL images through the original torchvision chain per sample (Resize 224,
  ColorJitter, RandomGrayscale, flip, RandomRotation, RandomAffine, RandomPerspective,
  GaussianBlur, ToTensor, Normalize, RandomErasing), a DataLoader with one worker per core, then
  timm's Mixup/CutMix on the batch, moved to --device.

Each side runs a warm-up, then several timed windows; the median images/s of each is reported,
with their ratio under the key `ratio`. Prints JSON.

The original side's DataLoader keeps `prefetch_factor` (2) batches per worker queued ahead. Its
warm-up therefore takes at least three batches per worker, so that the queue filled while the
workers started has been drained before the clock starts (the consumer does nothing, so it
drains it faster than the workers refill it), and each window is a whole number of waves (one
batch from every worker): what is timed is the workers' own rate, not a queue already full.

    python benchmarks/bench_augment.py                 # CPU
    python benchmarks/bench_augment.py --device cuda   # the same, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from PIL import Image

from cifarlib.data.augment import BatchAugment, make_policy
from cifarlib.data.datasets import Batches, Split
from cifarlib.data.preprocess import normalization
from cifarlib.data.synthetic import make_images

MEAN, STD = normalization("resnet50")


def original_transform(size: int):
    from torchvision import transforms as T
    return T.Compose([
        T.Resize((size, size)),
        T.ColorJitter(0.3, 0.3, 0.3, 0.1), T.RandomGrayscale(p=0.2), T.RandomHorizontalFlip(),
        T.RandomRotation(15), T.RandomAffine(15, translate=(0.1, 0.1)),
        T.RandomPerspective(distortion_scale=0.5, p=0.2), T.GaussianBlur(3, sigma=(0.1, 0.2)),
        T.ToTensor(), T.Normalize(MEAN, STD), T.RandomErasing(p=0.3, scale=(0.05, 0.2)),
    ])


class PilDataset(torch.utils.data.Dataset):
    """CIFAR-style dataset: HWC uint8 arrays made into PIL images per sample, as torchvision's."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_windows(batches, device, warmup: int, windows: int, per_window: int) -> list[float]:
    """Images/s of each window, after `warmup` batches; `batches` yields (inputs, targets)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync(device)
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        for _ in range(per_window):
            x, _ = next(it)
            n += len(x)
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def ours(images, labels, device, size, batch_size):
    split = Split(images, labels).to(device)
    aug = BatchAugment(make_policy("original"), size, MEAN, STD, num_classes=100, seed=0)
    loader = Batches(split, batch_size, shuffle=True, drop_last=True)
    epoch = 0
    while True:
        for x, y in loader.epoch(epoch):
            yield aug(x, y)
        epoch += 1


def original(images, labels, device, size, batch_size, workers):
    from timm.data import Mixup
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.8, switch_prob=0.5, label_smoothing=0.1, num_classes=100)
    loader = torch.utils.data.DataLoader(
        PilDataset(images, labels, original_transform(size)), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda")
    while True:
        for x, y in loader:
            yield mixup(x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="original loop's DataLoader workers (default: one per usable core)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--per-window", type=int, default=4, help="batches per timed window")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--images", type=int, default=4096, help="synthetic 32x32 images in memory")
    a = p.parse_args()
    device = torch.device(a.device)
    labels = torch.arange(a.images) % 100
    images = make_images(labels, seed=0)

    waves = max(1, a.workers)
    plan = {"ours": (a.warmup, a.per_window),  # (warm-up batches, batches per window)
            "original": (max(a.warmup, 3 * waves), -(-max(a.per_window, waves) // waves) * waves)}
    results = {}
    for name, batches in (("ours", ours(images, labels, device, a.image_size, a.batch_size)),
                          ("original", original(images, labels, device, a.image_size, a.batch_size, a.workers))):
        warmup, per_window = plan[name]
        rates = timed_windows(batches, device, warmup, a.windows, per_window)
        results[name] = {"images_per_s": round(statistics.median(rates), 1),
                         "windows": [round(r, 1) for r in rates], "warmup_batches": warmup,
                         "batches_per_window": per_window}
        batches.close()
    print(json.dumps({
        "benchmark": "augmentation, original policy, 32 px uint8 -> normalised inputs + soft targets",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "image_size": a.image_size, "batch_size": a.batch_size, "original_workers": a.workers,
        "ours": results["ours"], "original": results["original"],
        "ratio": round(results["ours"]["images_per_s"] / results["original"]["images_per_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
