"""The network: backbones built with a new head and mapped onto six layer groups (`backbones`),
run folders and checkpoints (`checkpoints`), and the one evaluation path from uint8 images to
class scores that validation, testing and prediction share (`inference`)."""

from ..core import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "backbones": ["GROUPS", "build_model", "from_checkpoint", "layer_groups"],
    "inference": ["logits", "predict_split"],
})
