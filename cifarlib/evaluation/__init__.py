"""How good a trained model is: metrics from a checkpoint (`evaluate`), where it looked
(`explain`, `heatmap`), figures and tables for the notebooks (`plots`), and every run compared
(`runs`). `python -m cifarlib.runs` is its command."""

from ..core import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "evaluate": ["Evaluation", "evaluate_checkpoint", "newest_checkpoint"],
    "explain": ["gradcam"],
})
