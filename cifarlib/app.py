"""The upload app of notebook 05: pictures in, top-k classes out, a clear message per bad file.

Built on ipywidgets 8. The upload callback hands each file's bytes to the predictor and shows
what comes back; it then clears the upload, so that the pictures' bytes are not kept in the
widget state that a saved notebook would store.
"""

from __future__ import annotations

import html
import io

import ipywidgets as widgets
import matplotlib.pyplot as plt
from PIL import Image

from .errors import UserError
from .plots import png_bytes
from .predict import Prediction, Predictor
from .preprocess import cifar_like

ACCEPT = ".jpg,.jpeg,.png,.webp"


def bar_chart(p: Prediction):
    names, probs = [n for n, _ in p.top][::-1], [v for _, v in p.top][::-1]
    fig, ax = plt.subplots(figsize=(4.2, 0.35 * len(names) + 0.6))
    ax.barh(names, probs, color="tab:blue")
    for y, v in enumerate(probs):
        ax.text(min(v + 0.01, 0.85), y, f"{v:.1%}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    fig.tight_layout()
    plt.close(fig)
    return fig


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class UploadApp:
    """`UploadApp(predictor).widget` is the app; `show_file(name, content)` renders one file."""

    def __init__(self, predictor: Predictor, top_k: int = 5):
        self.predictor, self.top_k = predictor, top_k
        self.upload = widgets.FileUpload(accept=ACCEPT, multiple=True, description="Pictures")
        self.results = widgets.VBox()
        self.upload.observe(self._on_upload, names="value")
        self.widget = widgets.VBox([widgets.HTML(f"Upload one or more pictures ({ACCEPT})."), self.upload, self.results])

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        try:
            self.results.children = [self.show_file(f["name"], f["content"]) for f in files]
        finally:
            self.upload.value = ()  # don't keep the uploaded bytes in the notebook

    def show_file(self, name: str, content) -> widgets.Widget:
        title = f"<b>{html.escape(name)}</b>"
        try:
            data = bytes(content)
            p = self.predictor.predict(data, top_k=self.top_k)
        except UserError as e:
            return widgets.HTML(f"{title}: <span style='color:#b00'>{html.escape(str(e))}</span>")
        except Exception as e:  # never let one file break the app; say what happened
            return widgets.HTML(f"{title}: <span style='color:#b00'>could not be read "
                                f"({html.escape(type(e).__name__)}: {html.escape(str(e))})</span>")
        seen = Image.fromarray(cifar_like(data).permute(1, 2, 0).numpy()).resize((96, 96), Image.NEAREST)
        original = Image.open(io.BytesIO(data))
        original.thumbnail((160, 160))
        previews = widgets.HBox([widgets.Image(value=_png(original.convert("RGB")), format="png"),
                                 widgets.Image(value=_png(seen), format="png")])
        chart = widgets.Image(value=png_bytes(bar_chart(p), dpi=90), format="png")
        superclass = f"; superclass <b>{html.escape(p.superclass)}</b>" if p.superclass else ""
        caption = widgets.HTML(f"{title}: <b>{html.escape(p.top[0][0])}</b> ({p.top[0][1]:.1%}){superclass}"
                               "<br><small>your picture, and the 32 px image the model sees</small>")
        return widgets.HBox([widgets.VBox([caption, previews]), chart])
