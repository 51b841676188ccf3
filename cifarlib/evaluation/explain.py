"""Where the model looked: Grad-CAM maps (Selvaraju et al., 2017) on the backbone's last feature map.

    p = Predictor.from_checkpoint("checkpoints/my-run/best.pt")
    m = p.explain("cat.jpg")              # float32 (store_size, store_size) in [0, 1], top class
    prediction, m = p.predict_and_explain("cat.jpg")   # both from one forward pass

The map is Grad-CAM for one class: the last feature map's channels weighted by the mean gradient
of that class's score, summed, negative values cut, scaled to [0, 1] (from its minimum to its
maximum), and resized (bilinear) to the picture's stored size. The layer: `layer4`'s output for ResNets
(torchvision's and timm's), the output of `forward_features` for other timm models (for
EfficientNets, `bn2`); for other models, the last layer with a spatial output (torchcam's
guess). At 32 px a ResNet's last map is 1x1, and so says nothing: the map is then all zeros.

The prediction and its map come from one forward pass with gradients, in fp32 (a GPU's bf16
would round the small gradients), and a backward pass from the class score down to that layer
only: on the CPU this costs a fraction more than a prediction, not twice (README, "Where the
model looked", has the figures).

Grad-CAM comes from `torchcam` (0.5). Of the two kept libraries that implement it, torchcam
needs nothing this project does not already install (torch, numpy, pillow, matplotlib), takes
the layer as a module name, works from the scores of a forward pass we run ourselves (so one
pass gives both the prediction and the map), and hooks any module, so ResNets and timm's
EfficientNets alike. pytorch-grad-cam (`grad-cam`) pulls in OpenCV, scikit-learn, SciPy and
ttach, and runs its own forward pass, so the prediction would need a second one.
"""

from __future__ import annotations

import operator
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.errors import UserError
from ..data.preprocess import cifar_like, evaluation_inputs
from .evaluate import confident_mistakes
from .heatmap import overlay as overlay_array


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layer's name, found once


def target_layer(model: nn.Module, image_size: int = 64) -> str:
    """The name of the module whose output Grad-CAM weighs (see the module docstring)."""
    if model not in _LAYERS:
        _LAYERS[model] = _find_layer(model, image_size)
    return _LAYERS[model]


def _find_layer(model: nn.Module, image_size: int) -> str:
    if hasattr(model, "layer4"):  # ResNets, torchvision's and timm's
        return "layer4"
    if hasattr(model, "forward_features"):  # timm: the module whose output forward_features returns
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.append((n, o)))
                 for n, m in model.named_modules() if n]
        try:
            with torch.no_grad():
                p = next(model.parameters())
                features = model.forward_features(torch.zeros(1, 3, image_size, image_size, device=p.device))
        finally:
            for h in hooks:
                h.remove()
        found = [n for n, o in outputs if o is features]
        if found and features.ndim == 4:
            return found[-1]
    from torchcam.methods._utils import locate_candidate_layer

    name = locate_candidate_layer(model, (3, image_size, image_size))
    if not name:
        raise UserError(f"{type(model).__name__} has no spatial feature map to explain (Grad-CAM needs a "
                        "convolutional backbone, such as a ResNet or an EfficientNet).")
    return name


def _class_numbers(class_index, pictures: int, classes: int) -> list[int]:
    """`class_index` as one class number per picture: any integer-like value (a numpy integer from
    an `argmax` included), for all, or a sequence of them, one per picture."""
    try:
        index = [operator.index(class_index)] * pictures if not hasattr(class_index, "__len__") else \
            [operator.index(i) for i in class_index]
    except TypeError:
        index = []
    if len(index) != pictures or not all(0 <= i < classes for i in index):
        raise UserError(f"class_index must be a class number from 0 to {classes - 1} (or one per picture), "
                        f"not {class_index!r}.")
    return index


def gradcam(model: nn.Module, images: torch.Tensor, image_size: int, mean, std,
            class_index: int | list[int] | None = None, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, h, w) on the model's device -> (logits (B, classes), maps (B, h, w) in [0, 1]),
    from one forward pass with gradients; the maps are for `class_index` (one for all, or one per
    image) or, by default, each image's top class."""
    from torchcam.methods import GradCAM

    x = evaluation_inputs(images, image_size, mean, std).requires_grad_()  # a graph even if weights are frozen
    with torch.enable_grad(), GradCAM(model, layer or target_layer(model, image_size)) as cam:
        scores = model(x).float()
        index = scores.argmax(1).tolist() if class_index is None else _class_numbers(class_index, len(x), scores.shape[1])
        (maps,) = cam(index, scores)
    maps = F.interpolate(maps.unsqueeze(1).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return scores.detach(), maps.squeeze(1).clamp(0, 1).nan_to_num(0)


def overlay(image: torch.Tensor, heat: torch.Tensor | np.ndarray, size: int | None = None,
            alpha: float = 0.5) -> Image.Image:
    """A picture (uint8 (3, h, w)) with its map (h, w) in [0, 1] laid over it in the `jet`
    colours, blended `alpha`; enlarged to `size` px (the picture nearest, the map bilinear):
    `cifarlib.evaluation.heatmap.overlay`, which the web app's pages use without torch."""
    return overlay_array(image.permute(1, 2, 0).cpu().numpy(), np.asarray(heat, dtype=np.float32), size, alpha)


def overlaid_mistakes(predictor, images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                      n: int = 16) -> torch.Tensor:
    """A copy of `images` (uint8 (N, 3, h, w)) in which the `n` most confident mistakes (those
    `evaluate.confident_mistakes` picks, as notebook 04's gallery does) carry the map of the class
    they were mistaken for."""
    pick, _, pred = confident_mistakes(probs, labels, n)
    out = images.clone()
    if len(pick):
        dev = predictor.device
        _, maps = gradcam(predictor.model, images[pick].to(dev), predictor.size, predictor.mean, predictor.std,
                          pred[pick].tolist())
        for i, m in zip(pick.tolist(), maps.cpu()):
            out[i] = torch.from_numpy(np.asarray(overlay(images[i], m))).permute(2, 0, 1)
    return out


def side_by_side(picture, heat: np.ndarray, size: int, scale: int = 128) -> Image.Image:
    """The picture as the model sees it (made CIFAR-like at the stored `size`), and the same with
    its map laid over it, side by side, each enlarged to `scale` px (notebook 05's headless view)."""
    seen = cifar_like(picture, size)
    out = Image.new("RGB", (2 * scale + 4, scale), "white")
    out.paste(overlay(seen, heat, scale, alpha=0), (0, 0))
    out.paste(overlay(seen, heat, scale), (scale + 4, 0))
    return out
