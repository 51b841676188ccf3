"""The pictures and their labels: CIFAR and folders of one's own pictures read, checked, split and
cached as uint8 tensors (`datasets`, `sources`, `splits`, `folders`, `imagecache`, `synthetic`,
`classes`) on the device, in the host's memory or mapped from disk (`mapped`), a user's picture
brought to the model's input (`pictures`, `preprocess`), and augmentation in whole batches on
the device (`augment`, `geometry`).
`python -m cifarlib.data` fetches and checks a dataset ahead of time."""

from ..core import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "datasets": ["Batches", "CifarData", "Split", "load_cifar", "resolve_dataset"],
    "augment": ["POLICIES", "BatchAugment", "make_policy"],
    "preprocess": ["normalization"],
    "synthetic": ["make_images"],
})
