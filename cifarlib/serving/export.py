"""A checkpoint as one ONNX file that runs without this project or PyTorch, and a JSON sidecar.

    python -m cifarlib.export CHECKPOINT [--out PATH] [--cams]

writes `PATH` (default: `model.onnx` beside the checkpoint) and `PATH.json`.

The model's input, `images`, is a batch of uint8 RGB pictures at the checkpoint's stored size in
NHWC layout, (batch, store_size, store_size, 3): what `np.asarray` of a PIL image gives, stacked.
The batch axis is dynamic. The graph does the rest of the evaluation path
(`cifarlib.data.preprocess.evaluation_inputs`): the bilinear resize to the model's input size and the
backbone's normalisation. Its output, `logits`, is float32 (batch, classes). Left to the caller
is the first half of the rule for user pictures: EXIF rotation, RGB, the shorter side resized to
the stored size and the centre cropped (the README's "Export and deploy" does it in a dozen lines
of PIL). The sidecar holds `classes`, `store_size`, `layout` ("NHWC"), `dtype` ("uint8"),
`backbone`, `version` (cifarlib's), `val_acc` (the checkpoint's), `superclasses` and
`fine_to_coarse` (CIFAR-100's, to name a prediction's superclass; null for other datasets), and
`image_size`, `input` and `outputs` for the curious, and `sha256`, the model file's own hash: the
two files are written one after the other, so a page checks that they belong together
(`OnnxPredictor.from_export` refuses a model whose hash is not its sidecar's).

`--cams` adds a second output, `cams` (batch, classes, h, w): for every class, the last feature
map's channels weighted by that class's row of the classifier (class activation maps, Zhou et
al., 2016). Where the head is global average pooling and one linear layer (ResNets, timm's
EfficientNets; anything else is refused), Grad-CAM's channel weights are exactly that row
divided by h x w, so `cams[b, c]` with negative values cut, scaled to [0, 1] and resized to the
stored size is `Predictor.explain`'s map for class c, computed without PyTorch or a backward pass.

The export uses torch's dynamo exporter (TorchScript is deprecated in this torch), offline, and
keeps the weights inside the one file (`external_data=False`). Before the file takes its name,
onnxruntime runs it on 7 seeded random pictures and its logits must agree with PyTorch's
(`cifarlib.model.inference.logits`) to 1e-3 with the same top class, and its cams with PyTorch's to
1e-3 of their range; a failed export leaves any earlier file in place, and says so in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core import runtime
from ..core.errors import UserError, cli_errors
from ..core.files import write_atomically
from ..data.preprocess import CIFAR_SIZE, evaluation_inputs

NEEDED = ("onnx", "onnxscript", "onnxruntime")  # torch's exporter imports onnxscript; the check runs onnxruntime
TOLERANCE = 1e-3  # largest difference allowed between onnxruntime's logits and PyTorch's (fp32)


class Deployed(nn.Module):
    """The model with its preprocessing in front: uint8 NHWC pictures -> logits (and cams)."""

    def __init__(self, model: nn.Module, image_size: int, mean, std, cams: bool = False):
        super().__init__()
        self.model, self.image_size, self.mean, self.std, self.cams = model, image_size, tuple(mean), tuple(std), cams

    def forward(self, images: torch.Tensor):
        x = evaluation_inputs(images.permute(0, 3, 1, 2), self.image_size, self.mean, self.std)
        if not self.cams:
            return self.model(x)
        features, logits = features_and_logits(self.model, x)
        return logits, torch.einsum("bkhw,ck->bchw", features, classifier(self.model).weight)


def classifier(model: nn.Module) -> nn.Linear:
    from ..model.backbones import head_name
    return model.get_submodule(head_name(model))


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last feature map and the logits, from one forward pass (ResNets and timm models)."""
    if hasattr(model, "forward_head"):  # timm
        features = model.forward_features(x)
        return features, model.forward_head(features)
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        m = model
        features = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        return features, m.fc(torch.flatten(m.avgpool(features), 1))
    raise UserError(f"--cams works for ResNets and timm models, not {type(model).__name__}; export without it.")


def _check_head(model: nn.Module, ckpt: dict, size: int) -> None:
    """Refuse --cams for a model whose head is not global average pooling and one linear layer
    over a (B, C, h, w) feature map: its maps would not be Grad-CAM's, or not maps at all (a ViT's
    tokens; MobileNetV3's head has a convolution after the pooling)."""
    refuse = UserError(f"--cams needs a head of global average pooling and one linear layer over a spatial feature "
                       f"map, and {ckpt['backbone']}'s is not; export without it.")
    noise = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, scores = features_and_logits(model, evaluation_inputs(noise, ckpt["image_size"], ckpt["mean"], ckpt["std"]))
        if features.dim() != 4:
            raise refuse
        try:
            pooled = classifier(model)(features.mean((2, 3)))
        except (RuntimeError, ValueError, IndexError):  # the classifier does not take the pooled channels
            raise refuse from None
        if pooled.shape != scores.shape or not torch.allclose(pooled, scores, atol=1e-4):
            raise refuse


def require() -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"exporting needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        f"installed: pip install {' '.join(missing)}")


def _writable(out: Path) -> None:
    """Make `out`'s folder if needed and write a file there, before the slow export."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}): choose another --out, in a folder you can "
                        "write to.") from None


def _check(onnx_bytes: bytes, model: nn.Module, ckpt: dict, cams: bool) -> float:
    """onnxruntime against PyTorch on 7 seeded random pictures: the logits, and the cams where
    exported; the largest logit difference. A disagreement is a UserError: nothing is written."""
    import onnxruntime as ort
    from ..model.inference import logits

    size = ckpt.get("store_size", CIFAR_SIZE)
    images = torch.randint(0, 256, (7, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = logits(model, images, ckpt["image_size"], ckpt["mean"], ckpt["std"])
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.permute(0, 2, 3, 1).numpy()})
    got = torch.from_numpy(outputs[0])
    diff = (got - expected).abs().max().item()
    wrong = diff > TOLERANCE or not torch.equal(got.argmax(1), expected.argmax(1))
    what = f"largest logit difference {diff:.2e}"
    if cams and not wrong:
        with torch.no_grad():
            want = Deployed(model, ckpt["image_size"], ckpt["mean"], ckpt["std"], cams=True)(images.permute(0, 2, 3, 1))[1]
        cam_diff = (torch.from_numpy(outputs[1]) - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        wrong, what = cam_diff > TOLERANCE, f"the cams differ by {cam_diff:.2e} of their range"
    if wrong:
        raise UserError(f"the exported model disagrees with PyTorch ({what}); nothing was written. Please report "
                        "this with the checkpoint's backbone.")
    return diff


def export(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, cams: bool = False) -> tuple[Path, Path]:
    """Write the ONNX model and its sidecar (see the module docstring); returns their paths."""
    require()
    import onnx

    from ..model import checkpoints
    from ..model.backbones import from_checkpoint

    path = runtime.resolve_path(checkpoint)
    model, ckpt = from_checkpoint(path, "cpu")
    model = model.to(memory_format=torch.contiguous_format)
    out = path.parent / "model.onnx" if out is None else runtime.resolve_path(out)
    out = out / "model.onnx" if out.is_dir() else out
    _writable(out)
    size = ckpt.get("store_size", CIFAR_SIZE)
    sample = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: export keeps 0 and 1 apart
    wrapped = Deployed(model, ckpt["image_size"], ckpt["mean"], ckpt["std"], cams).eval()
    outputs = ["logits", "cams"] if cams else ["logits"]
    if cams:  # the maps are Grad-CAM's only for a head of average pooling and one linear layer
        _check_head(model, ckpt, size)
    with torch.no_grad():
        program = torch.onnx.export(wrapped, (sample,), dynamo=True, external_data=False, input_names=["images"],
                                    output_names=outputs, dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                    verbose=False)
    data = program.model_proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    diff = _check(data, model, ckpt, cams)
    sidecar = out.with_name(out.name + ".json")
    write_atomically(out, data, "Free some space, or choose another --out.")
    val_acc = (ckpt.get("metrics") or {}).get("val_acc")
    checkpoints.write_json({"classes": list(ckpt["classes"]), "store_size": size, "layout": "NHWC", "dtype": "uint8",
                            "backbone": ckpt["backbone"], "version": __version__, "val_acc": val_acc,
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "superclasses": list(ckpt["superclasses"] or []) or None,
                            "fine_to_coarse": [int(c) for c in ckpt["fine_to_coarse"]] if ckpt["superclasses"] else None,
                            "image_size": ckpt["image_size"], "input": "images", "outputs": outputs}, sidecar)
    print(f"wrote {out} ({len(data) / 1e6:.1f} MB) and {sidecar.name}; onnxruntime agrees with PyTorch on 7 "
          f"pictures (largest logit difference {diff:.1e})")
    return out, sidecar


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cifarlib.export",
                                 description="Export a checkpoint to ONNX, with its preprocessing inside the graph.")
    ap.add_argument("checkpoint", help="a best.pt or last.pt written by training")
    ap.add_argument("--out", help="the .onnx file to write (default: model.onnx beside the checkpoint); "
                                  "its sidecar is this path with .json appended")
    ap.add_argument("--cams", action="store_true", help="also output every class's activation map (see the module docstring)")
    args = ap.parse_args(argv)
    with cli_errors(ap.prog):
        export(args.checkpoint, args.out, args.cams)


if __name__ == "__main__":
    main()
