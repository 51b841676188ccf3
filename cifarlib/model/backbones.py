"""Backbones: build one with a new classifier head, load its weights, and map it onto six groups.

Any torchvision classification model name and any timm model name works; `resnet50` with
torchvision's IMAGENET1K_V2 weights is the project's default. `weights` is `"imagenet"` (the
library's own download or cache), `"none"` (random init) or a path to a local state_dict file.
The new head starts at zero (`zero_head`) unless `head_init="default"`.

Layer groups, for staged unfreezing and per-group learning rates, are six slots from input to
output: `stem, layer1, layer2, layer3, layer4, head`.

- ResNets (torchvision's or timm's) fill them with their own modules: conv1+bn1, layer1..4, fc.
- timm models: timm's group matcher orders the parameters into stem, blocks and the rest; the
  first group is the stem, the classifier is the head, and the blocks in between (with any
  final norm) are split into four contiguous parts of about equal depth.
- Other torchvision models: the longest sequence of parameterised blocks in the model (for
  example `features` of an EfficientNet, `encoder.layers` of a ViT) is the body, split the same
  way; what comes before it is the stem (its first block if nothing does), the classifier (the
  last Linear) the head, and anything else after the body joins layer4.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..core import runtime
from ..core.errors import UserError
from ..data import sources

GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def _is_torchvision(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models)


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear classifier to replace.")
    return names[-1]


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier module."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str) and isinstance(model.get_submodule(name), nn.Linear):
        return name
    return _last_linear(model)


def _offline_error(backbone: str, reason: str) -> UserError:
    return UserError(
        f"the ImageNet weights of {backbone} are not cached here and cannot be downloaded ({reason}). "
        f"Either pass weights=<path to a local state_dict file of {backbone}> (for example one saved "
        "with torch.save(model.state_dict(), path) on a machine with internet), or train from "
        "scratch with weights=\"none\".")


def _imagenet_torchvision(backbone: str) -> dict:
    w = torchvision.models.get_model_weights(backbone).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(w.url).path)
    if not cached.is_file():
        reason = sources.unreachable(urllib.parse.urlsplit(w.url).hostname or "", 10)
        if reason:
            raise _offline_error(backbone, reason)
    try:
        return w.get_state_dict(progress=runtime.is_main_process(), check_hash=True)
    except (OSError, RuntimeError) as e:
        raise _offline_error(backbone, str(e)) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a file that is not a state_dict
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}: {e}).") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state_dict (a dict of parameter names to tensors).")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `sd`, dropping head tensors that don't fit the new head; any other mismatch is an
    error listing what did not match. Returns the names of the dropped tensors."""
    head, own = head_name(model), model.state_dict()
    dropped = [k for k in sd if k.startswith(head + ".") and (k not in own or own[k].shape != sd[k].shape)]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    # older files lack BatchNorm's num_batches_tracked, which PyTorch itself loads without
    missing = [k for k in own if k not in sd and not k.startswith(head + ".") and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} (model: {tuple(own[k].shape)})" for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        show = lambda items: ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")  # noqa: E731
        parts = [f"missing: {show(missing)}" if missing else "", f"unexpected: {show(unexpected)}" if unexpected else "",
                 f"wrong shape: {show(wrong)}" if wrong else ""]
        raise UserError(f"the weights in {source} do not fit {type(model).__name__}: " + "; ".join(p for p in parts if p) + ".")
    model.load_state_dict(sd, strict=False)
    if dropped and runtime.is_main_process():
        print(f"note: dropped the classifier head from {source} ({', '.join(dropped)}); the new head starts fresh.")
    return dropped


# Their training forward returns auxiliary or distillation outputs as well as the logits.
UNSUPPORTED = ("googlenet", "inception_v3")


def build_model(backbone: str = "resnet50", num_classes: int = 100, weights: str = "imagenet",
                head_init: str = "zero") -> nn.Module:
    """The backbone with a `num_classes` head and the weights asked for (see the module docstring).
    The new head starts at zero (`head_init="zero"`, see `zero_head`) or as its library makes it
    (`"default"`: PyTorch's init for torchvision, timm's for timm)."""
    local = weights not in ("imagenet", "none")
    if backbone in UNSUPPORTED or "distilled" in backbone:
        raise UserError(f"{backbone} is not supported: in training it returns auxiliary outputs "
                        "besides the class scores. Choose another backbone.")
    if _is_torchvision(backbone):
        model = torchvision.models.get_model(backbone, weights=None)
        if weights == "imagenet":
            model.load_state_dict(_imagenet_torchvision(backbone))
        name = _last_linear(model)
        old = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    else:
        import timm

        if not timm.is_model(backbone):
            raise UserError(f"unknown backbone {backbone!r}: neither a torchvision classification model "
                            "nor a timm model (see timm.list_models()).")
        if weights == "imagenet" and sources.unreachable("huggingface.co", 10):
            # no network: let the hub use its cache at once instead of retrying for a minute
            import huggingface_hub.constants
            huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            model = timm.create_model(backbone, pretrained=weights == "imagenet", num_classes=num_classes)
        except (OSError, RuntimeError) as e:
            if weights != "imagenet":
                raise
            raise _offline_error(backbone, f"{type(e).__name__}: {e}") from None
    if head_init == "zero":
        zero_head(model)  # before loading a local file, which may hold a head that fits
    if local:
        path = runtime.resolve_path(weights)
        load_weights(model, _read_state_dict(path), str(path))
    return model


def zero_head(model: nn.Module) -> None:
    """Start the new classifier at zero, so that the first predictions are uniform (loss ln C).

    timm initialises a new classifier uniformly in +-1/sqrt(classes): for 10 classes on
    EfficientNet-Lite0's 1280 features that gave logits with a standard deviation of 13 and a
    loss of 20 on real photos, which a one-epoch head stage could not undo (its validation loss
    stayed far above a uniform guess's; benchmarks/README.md). Zero is what Big Transfer
    (Kolesnikov et al., 2020) uses for fine-tuning; the gradient of a zero head is not zero.
    """
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


def _split4(units: list[str]) -> list[list[str]]:
    """Four contiguous parts of about equal length (the first ones longer by one when uneven)."""
    n, parts, start = len(units), [], 0
    for i in range(4):
        size = n // 4 + (1 if i < n % 4 else 0)
        parts.append(units[start:start + size])
        start += size
    return parts


def _assign(names: list[str], units: list[str]) -> dict[str, int]:
    """Index of the unit (a module prefix) each parameter belongs to; -1 if none."""
    return {n: next((i for i, u in enumerate(units) if n == u or n.startswith(u + ".")), -1) for n in names}


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names of each of the six slots in `GROUPS` (see the module docstring)."""
    head = head_name(model)
    names = [n for n, _ in model.named_parameters()]
    body_names = [n for n in names if not n.startswith(head + ".")]
    groups = {g: [] for g in GROUPS}
    groups["head"] = [n for n in names if n.startswith(head + ".")]
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")):
        for n, i in _assign(body_names, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]).items():
            groups[GROUPS[max(i - 1, 0)] if i >= 0 else "layer4"].append(n)
        return groups
    if hasattr(model, "group_matcher"):  # timm
        from timm.models import group_parameters

        ordered = [[n for n in g if n in body_names] for g in group_parameters(model, model.group_matcher(coarse=False)).values()]
        ordered = [g for g in ordered if g]
        groups["stem"] = ordered[0]
        for slot, part in zip(GROUPS[1:5], _split4(list(range(1, len(ordered))))):
            groups[slot] = [n for i in part for n in ordered[i]]
        return groups
    # the body: of the sequences of at least four parameterised blocks, the one holding most weights
    seqs = [([f"{name}.{c}" if name else c for c, m in mod.named_children() if any(True for _ in m.parameters())],
             sum(p.numel() for p in mod.parameters()))
            for name, mod in model.named_modules() if isinstance(mod, (nn.Sequential, nn.ModuleList))]
    seqs = [s for s in seqs if len(s[0]) >= 4] or [([], 0)]
    units, _ = max(seqs, key=lambda s: s[1])
    where = _assign(body_names, units)
    first = min((i for i, n in enumerate(body_names) if where[n] >= 0), default=0)
    stem_units = [] if first > 0 else units[:1]
    body = units[len(stem_units):]
    parts = _split4(body)
    for i, n in enumerate(body_names):
        u = where[n]
        if u < 0:
            groups["stem" if i < first else "layer4"].append(n)
        elif units[u] in stem_units:
            groups["stem"].append(n)
        else:
            groups[next(GROUPS[1 + k] for k, p in enumerate(parts) if units[u] in p)].append(n)
    return groups


def from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a cifarlib checkpoint, in eval mode on `device`, and the checkpoint."""
    from .checkpoints import load

    ckpt = load(path)
    model = build_model(ckpt["backbone"], len(ckpt["classes"]), weights="none")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path} does not hold {ckpt['backbone']} weights as it claims: "
                        f"{' '.join(line.strip() for line in first[:3])[:400]}") from None
    device = torch.device(device)
    return model.to(device, memory_format=runtime.auto_plan(device).memory_format).eval(), ckpt
