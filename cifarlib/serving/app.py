"""The upload app of notebook 05: pictures in, top-k classes out, a clear message per bad file.

Built on ipywidgets 8; `make app` serves the notebook as a web page (see `cifarlib.serving.serve`). The
upload callback hands each file's bytes to the predictor and shows what comes back; it then clears
the upload, so that the pictures' bytes are kept neither in the kernel nor in the widget state
that a saved notebook would store.

The app needs neither torch nor the model's library: it takes any predictor with `store_size`,
`predict` and `predict_and_explain` (`cifarlib.serving.predict.Predictor`, on PyTorch, or
`cifarlib.serving.onnxpredict.OnnxPredictor`, on onnxruntime, which the web app's pages run because it
costs them a quarter of the memory). `page_predictor` picks one for notebook 05.
"""

from __future__ import annotations

import html
import io

import ipywidgets as widgets
import numpy as np
from PIL import Image

from ..core.errors import UserError
from ..data.pictures import UPLOAD_FORMATS, decode, fit
from ..evaluation.heatmap import overlay
from .prediction import Prediction

ACCEPT = ".jpg,.jpeg,.png,.webp,.gif,.bmp"  # the browser's filter; the server checks the content (UPLOAD_FORMATS)
MAX_BYTES = 20_000_000  # larger files are refused on their size, before any decoding
MAX_FILES = 16  # files read from one upload: each costs at most about 1 s of a core (pictures.MAX_PIXELS)
THUMBNAIL = 160  # the longer side of the picture as shown


def bars(p: Prediction) -> str:
    """The top classes as an HTML bar chart. Drawn in HTML rather than matplotlib so that names and
    probabilities stay text (readable by screen readers and by the browser test), and cheap."""
    rows = "".join(f"<tr><td style='padding-right:0.6em'>{html.escape(name)}</td><td style='width:10em'>"
                   f"<div style='background:#1f77b4;height:0.9em;width:{100 * prob:.1f}%'></div></td>"
                   f"<td style='text-align:right;padding-left:0.6em'>{prob:.1%}</td></tr>" for name, prob in p.top)
    return f"<table style='border-collapse:collapse'>{rows}</table>"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def page_predictor(checkpoint: str = "", onnx_model: str = ""):
    """The predictor notebook 05 runs: the exported `onnx_model` on onnxruntime when one is given
    (what `make app` serves), else `checkpoint` (or the newest) on PyTorch."""
    if onnx_model:
        from .onnxpredict import OnnxPredictor
        from ..core.runtime import resolve_path
        return OnnxPredictor.from_export(resolve_path(onnx_model))
    from ..evaluation.evaluate import newest_checkpoint
    from .predict import Predictor
    return Predictor.from_checkpoint(checkpoint or newest_checkpoint())


def views(content, size: int) -> tuple[Image.Image, np.ndarray]:
    """The picture decoded once (at a scale where both sides stay at least max(2 x `size`,
    `THUMBNAIL`), so that a large JPEG decodes fast and its thumbnail is still sharp), and from that
    one decode: the thumbnail shown, and the uint8 (size, size, 3) image the model sees (made
    CIFAR-like, at the checkpoint's stored size)."""
    picture = decode(content, max(2 * size, THUMBNAIL), formats=UPLOAD_FORMATS)
    seen = fit(picture, size)
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return picture, seen


class UploadApp:
    """`UploadApp(predictor).widget` is the app; `show_file(name, content)` renders one file.

    With `explain` (the default), each result also shows where the model looked: the Grad-CAM map
    of the top class over the image the model sees, from the same forward pass as the prediction
    (`Predictor.predict_and_explain`)."""

    def __init__(self, predictor, top_k: int = 5, explain: bool = True):
        self.predictor, self.top_k, self.explain = predictor, top_k, explain
        self.size = predictor.store_size  # the size its images were stored at (32 for CIFAR)
        self.upload = widgets.FileUpload(accept=ACCEPT, multiple=True, description="Pictures")
        self.results = widgets.VBox()
        self.upload.observe(self._on_upload, names="value")
        self.widget = widgets.VBox([widgets.HTML(f"Upload up to {MAX_FILES} pictures at a time (JPEG, PNG, WebP, "
                                                 f"GIF or BMP), up to {MAX_BYTES // 1_000_000} MB each."),
                                    self.upload, self.results])

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        try:
            read = files[:MAX_FILES]  # the work one message may ask for is bounded too
            self.results.children = [widgets.HTML(f"<i>Reading {len(read)} file(s)...</i>")]
            shown = [self.show_file(f["name"], f["content"]) for f in read]
            if len(files) > MAX_FILES:
                shown.append(self._message(f"<b>{len(files) - MAX_FILES} more file(s)</b>",
                                           f"not read: at most {MAX_FILES} pictures at a time; upload the rest after."))
            self.results.children = shown
        finally:
            self.upload.value = ()  # don't keep the uploaded bytes

    def show_file(self, name: str, content) -> widgets.Widget:
        title = f"<b>{html.escape(name)}</b>"
        try:
            p, previews = self._predict(content)
        except UserError as e:
            return self._message(title, str(e))
        except Exception as e:  # never let one file break the app; say what happened
            return self._message(title, f"could not be read ({type(e).__name__}: {e})")
        superclass = f"; superclass <b>{html.escape(p.superclass)}</b>" if p.superclass else ""
        shown = (f"your picture, the {self.size} px image the model sees, and where it looked for "
                 f"{html.escape(p.top[0][0])} (Grad-CAM: red counted most)" if self.explain else
                 f"your picture, and the {self.size} px image the model sees")
        caption = widgets.HTML(f"{title}: <b>{html.escape(p.top[0][0])}</b> ({p.top[0][1]:.1%}){superclass}"
                               f"<br><small>{shown}</small>")
        chart = widgets.HTML(bars(p), layout=widgets.Layout(margin="0 0 0 2em"))
        box = widgets.HBox([widgets.VBox([caption, previews], layout=widgets.Layout(width="440px", min_width="440px")), chart],
                           layout=widgets.Layout(margin="0.5em 0"))
        return box.add_class("cifar-result")

    def _predict(self, content) -> tuple[Prediction, widgets.HBox]:
        size = memoryview(content).nbytes
        if size > MAX_BYTES:  # before decoding anything
            raise UserError(f"the file is {size / 1e6:.1f} MB, above the limit of {MAX_BYTES / 1e6:.0f} MB; "
                            "save the picture smaller (the model sees it at a few dozen pixels anyway).")
        shown, seen = views(content, self.size)
        big = self.size * max(1, 128 // self.size)
        images = [shown, Image.fromarray(seen).resize((big, big), Image.NEAREST)]
        if self.explain:
            p, heat = self.predictor.predict_and_explain(seen, top_k=self.top_k)
            images.append(overlay(seen, heat, big))
        else:
            p = self.predictor.predict(seen, top_k=self.top_k)
        tags = ("picture", "seen", "looked")
        return p, widgets.HBox([widgets.Image(value=_png(im), format="png", layout=widgets.Layout(margin="0 4px 0 0"))
                                .add_class(f"cifar-{tag}") for im, tag in zip(images, tags)])

    @staticmethod
    def _message(title: str, text: str) -> widgets.HTML:
        return widgets.HTML(f"{title}: <span style='color:#b00'>{html.escape(text)}</span>").add_class("cifar-message")
