"""A trained model put to use: predictions for a user's pictures (`predict`, `prediction`), the
export to ONNX and its runtime without torch (`export`, `onnxpredict`), and notebook 05's widget
served as a web page (`app`, `appserver`, `serve`). Its commands are `python -m cifarlib.predict`,
`cifarlib.export` and `cifarlib.serve`."""

from ..core import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "predict": ["Predictor"],
    "onnxpredict": ["OnnxPredictor"],
    "prediction": ["Prediction", "format_prediction"],
    "app": ["UploadApp", "page_predictor"],
})
