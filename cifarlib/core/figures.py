"""What every figure of the package shares: one drawing at a time, PNG bytes, a PNG file written
atomically, and a figure that shows itself in a notebook without pyplot."""

from __future__ import annotations

import functools
import threading

from matplotlib.figure import Figure


# One figure drawn at a time. matplotlib's text layout is not thread-safe (its mathtext parser is
# shared), and the background saver draws loss_curves.png while a notebook draws its live curves:
# two at once fail with a ParseException on a log axis's "$10^{-4}$". Reentrant: loss_curves lays
# its figure out (tight_layout measures the text), then png_bytes renders it.
_DRAWING = threading.RLock()


def _one_at_a_time(draw):
    @functools.wraps(draw)
    def locked(*args, **kwargs):
        with _DRAWING:
            return draw(*args, **kwargs)
    return locked


class ShownFigure(Figure):
    """A figure made without pyplot (whose global state is not thread-safe) that still shows
    itself in a notebook: IPython has no printer for a bare Figure until pyplot's inline backend
    has loaded, so it brings its own PNG representation."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


def png_bytes(fig, dpi: int = 110) -> bytes:
    """A figure as PNG bytes."""
    import io
    buf = io.BytesIO()
    with _DRAWING:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_png(fig, path) -> None:
    """Save a figure as PNG through a temporary file and a rename."""
    from .files import write_atomically
    write_atomically(path, png_bytes(fig))
