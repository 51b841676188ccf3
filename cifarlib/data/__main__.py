"""`python -m cifarlib.data`: find, extract or download a dataset ahead of time, check it, and
summarise it."""

from __future__ import annotations

import argparse

from ..core.errors import cli_errors
from .datasets import DATASETS, SPLITS, load_cifar


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cifarlib.data",
                                description="Find, extract or download a dataset, check it, and summarise it.")
    p.add_argument("--dataset", default="cifar100", choices=DATASETS)
    p.add_argument("--data-dir", default="data", help="relative paths are from the project root; for "
                   "--dataset folder, a folder of pictures or a .tar, .tar.gz or .zip of one")
    p.add_argument("--store-size", type=int, default=32, help="folder: pixels each image is stored at")
    p.add_argument("--cache-dir", default="data", help="folder: where archives are extracted and images cached")
    p.add_argument("--no-verify", action="store_true", help="skip the official MD5 checksums")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with cli_errors(p.prog):
        d = load_cifar(args.dataset, args.data_dir, val_fraction=args.val_fraction, seed=args.seed,
                       verify_checksums=not args.no_verify, download=not args.no_download,
                       device="cpu", store_size=args.store_size, cache_dir=args.cache_dir)
        print(f"{d.name}: {d.num_classes} classes from {d.folder}")
        for name in SPLITS:
            print(f"  {name:5s} {len(getattr(d, name)):6d} images")
        if d.name == "folder":
            print(f"classes: {', '.join(d.classes)}")
            print(f"skipped {len(d.skipped)} file(s)" + "".join(f"\n  {s}" for s in d.skipped))


if __name__ == "__main__":
    main()
