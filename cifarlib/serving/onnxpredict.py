"""Predictions and where the model looked, from an exported model, with onnxruntime and no PyTorch.

    p = OnnxPredictor.from_export("runs/app/model.onnx")   # written by python -m cifarlib.export CKPT --cams
    prediction, heat = p.predict_and_explain("cat.jpg")

The same interface as `cifarlib.serving.predict.Predictor` for what the upload app needs (`predict`,
`predict_and_explain`, `classes`, `store_size`), and the same results: the picture is made
CIFAR-like by the same rule (`cifarlib.data.pictures`), the graph does the resize and normalisation,
and the map of the top class is Grad-CAM's, from the export's `cams` output (`cifarlib.evaluation.heatmap`).

Why: this is what the web app's pages run. A page that imports torch to run the model holds four
to six times the memory of one that runs the exported model with onnxruntime: with
EfficientNet-Lite0, 818 MB against 141 in a process of its own (benchmarks/bench_page.py), and
496 MB against 112 for each more page of a served app, whose pages share the libraries' code
(benchmarks/bench_app.py). It is also ready in a tenth of the time (0.7 s against 5.8 s) and
answers an upload faster (14 ms against 31); 8 visitors at once had their answers within 29 s
against 78 (benchmarks/README.md, "The web app under load"). On a shared server, memory is the
number of visitors it can hold at once. Each session runs on one thread, without spinning: a server's pages
share its cores, and onnxruntime's default (a spinning thread per core, per page) would have every
idle page compete with the one that is answering.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..data.pictures import cifar_like
from ..evaluation.heatmap import cam_map
from .prediction import Prediction, top_predictions


class OnnxPredictor:
    def __init__(self, model: str | Path | bytes, meta: dict, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.classes, self.store_size = list(meta["classes"]), int(meta["store_size"])
        self.superclasses, self.fine_to_coarse = meta.get("superclasses"), meta.get("fine_to_coarse")
        self.has_cams = "cams" in meta.get("outputs", [])
        self.device = "cpu, onnxruntime"

    @classmethod
    def from_export(cls, path: str | Path, threads: int = 1) -> OnnxPredictor:
        """The model `python -m cifarlib.export` wrote at `path`, and its sidecar (`path` + ".json")."""
        path = Path(path)
        sidecar = path.with_name(path.name + ".json")
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {sidecar}, the sidecar of {path} ({e}): export the checkpoint again "
                            "with python -m cifarlib.export CHECKPOINT --cams.") from None
        if not path.is_file():
            raise UserError(f"{path} does not exist: export the checkpoint with python -m cifarlib.export CHECKPOINT --cams.")
        model = path.read_bytes()  # read once: the bytes checked are the bytes loaded, whatever writes the file after
        if meta.get("sha256") and hashlib.sha256(model).hexdigest() != meta["sha256"]:
            raise UserError(f"{path} is not the model its sidecar {sidecar.name} describes (their hashes differ: one of "
                            "them was written by another export, or the export was cut short): export the checkpoint "
                            "again with python -m cifarlib.export CHECKPOINT --cams.")
        return cls(model, meta, threads)

    def _run(self, images, top_k: int) -> tuple[bool, list[Prediction], list[np.ndarray] | None]:
        if top_k < 1:
            raise UserError(f"top_k must be at least 1, not {top_k}.")
        single = not isinstance(images, (list, tuple))
        if not single and not images:
            raise UserError("no pictures given.")
        batch = np.stack([cifar_like(im, self.store_size) for im in ([images] if single else images)])
        outputs = self.session.run(None, {"images": batch})
        scores = outputs[0].astype(np.float64)
        probs = np.exp(scores - scores.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        predictions = top_predictions(probs, min(top_k, probs.shape[1]), self.classes, self.superclasses,
                                      self.fine_to_coarse)
        cams = [outputs[1][b, c] for b, c in enumerate(probs.argmax(1))] if self.has_cams else None  # the top class's
        return single, predictions, cams

    def predict(self, images, top_k: int = 5):
        """One picture (path, bytes, PIL image or array) -> a Prediction; a list -> a list."""
        single, predictions, _ = self._run(images, top_k)
        return predictions[0] if single else predictions

    def predict_and_explain(self, images, top_k: int = 5):
        """`predict` and the map of the top class (float32 (store_size, store_size) in [0, 1]), from
        one run of the model: a (Prediction, map) pair per picture; a list gives a list of pairs."""
        single, predictions, cams = self._run(images, top_k)
        if cams is None:
            raise UserError("this model was exported without its activation maps: export it again with --cams.")
        out = [(p, cam_map(cam, self.store_size)) for p, cam in zip(predictions, cams)]
        return out[0] if single else out
