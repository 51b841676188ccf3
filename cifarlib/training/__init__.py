"""Training: the settings and presets (`config`), the budget's plan and its probes (`budget`,
`trial`), a run made ready (`prepare`), its stages and epochs (`train`), the steps of an epoch
(`loop`), the optimizer and its saved state under any plan (`optimizer`), the run's state and
its saves (`run`, `runstate`), early stopping (`stopping`), signals and the clock (`guard`), and
the loss curves drawn while it trains (`curves`). `python -m cifarlib.train` is its command."""

from ..core import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "config": ["PRESETS", "Config", "Stage", "make_config"],
    "train": ["epochs", "find_lr", "format_row"],
    "curves": ["LiveCurves", "loss_curves"],
})
