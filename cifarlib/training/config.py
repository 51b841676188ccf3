"""Training configuration: stages as data, presets, epoch scaling and checked overrides.

A stage names the layer groups it trains (see `cifarlib.model.GROUPS`), the peak learning rate of
each, its share of the epochs, and the shape of its one-cycle schedule. A preset is a list of
stages plus the rest of the recipe. `make_config(preset, **overrides)` checks every override
(unknown keys, wrong types) and scales the stages to `epochs`.

`preset="auto"` (the default of notebook 03, `make train` and the command line) picks the recipe
that fits the device the run gets (`cifarlib.core.runtime.preset_for`): `original` on a CUDA GPU,
`cpu` elsewhere. Elsewhere it also sets `budget_minutes=AUTO_BUDGET_MINUTES` unless `epochs` or
`budget_minutes` is given, so that a first run on a laptop ends in a time it states at its start
instead of running for an unknown number of hours. It says what it chose, on stderr.

Presets:

- `original` reproduces the original project exactly, oddities included:
  * 10/15/75 epochs (of 100): the head alone at 0.01; then layer3/layer4/head at
    5e-4/1e-3/5e-3; then layer1..head at 5e-5/1e-4/3e-4/8e-4/2e-3;
  * the stem (conv1, bn1) is in no stage, so it keeps its ImageNet weights throughout, though
    the last stage is called "all layers";
  * SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 32, 224 px;
  * a fresh `OneCycleLR` per stage (30% warm-up, cosine annealing) with PyTorch's defaults,
    so the momentum is not 0.9 but cycles between 0.95 and 0.85 (`cycle_momentum`), and each
    stage starts from its peak / 25 and ends at its peak / 25 / 1e4;
  * early stopping on validation loss with patience 10, the counter reset at each stage, and a
    stop ends the whole run (in the other presets a stop ends only the current stage);
  * frozen layers' BatchNorm statistics keep updating (`frozen_bn="train"`): its README shows
    no BatchNorm handling, which suggests a plain `model.train()`, under which they do;
  * the new `fc` starts as `nn.Linear` makes it (`head_init="default"`), not at zero.
- `fast`: for a modern GPU. 16 epochs at batch 256: 1 epoch of head alone, then 15 of every
  group with rates rising from stem to head, SGD Nesterov, the `light` augmentation. Based on:
  Kornblith et al., "Do Better ImageNet Models Transfer Better?" (CVPR 2019), who fine-tune an
  ImageNet ResNet-50 on CIFAR-100 to about 86% at 224 px with SGD and Nesterov momentum;
  Kolesnikov et al., "Big Transfer (BiT)" (ECCV 2020), whose fine-tuning rule uses a few
  thousand steps, crops and flips, and light Mixup; Goyal et al., "Accurate, Large Minibatch
  SGD" (2017) for scaling the rate with the batch; Howard & Ruder, ULMFiT (2018) for
  discriminative rates. Its CIFAR-100 accuracy is a projection until someone measures it.
  What the `cpu` preset's tuning on real photographs taught, and what of it `fast` takes: the
  new head starts at zero (`head_init`, as in BiT); shifts mirror the border instead of leaving
  black bands (the `light` policy's `fill`), as a reflect-padded crop does; frozen BatchNorm
  stays in eval mode (on real photos, "eval" came out ahead of "train" by 0.2-0.25 points in
  both paired trials, and skips the statistics' update). Not taken: the AdamW rates (`fast`
  runs SGD, whose rates do not carry over), and dropping Mixup and label smoothing (measured in
  3-epoch runs; `fast` runs 16, where light regularisation pays more).
- `cpu`: a laptop budget, tuned on real photographs (CIFAR-10's 50,000 training JPEGs,
  EfficientNet-Lite0 with real ImageNet weights; every trial in benchmarks/README.md): one
  epoch of the head alone at 64 px and 1e-3, then layer2 to the head at 88 px (the `top`
  stage: the stem and layer1 stay frozen), AdamW with discriminative rates 1.25e-3 (layer2) to
  3e-3 (layer4) and 1e-2 (head), batch 64, the `crop`
  augmentation (flips and 4-px shifts with mirrored borders, no Mixup, no label smoothing), a
  zero head, frozen BatchNorm in eval mode. What each change bought, on a 10,000-image subset
  at the same settings otherwise: the `crop` policy instead of `light` +13.5 points; 96 px
  instead of 64 +12 (resolution buys more than epochs); rates 5x the first draft's +8.4;
  frozen BatchNorm in eval mode rather than updating +0.2; the head stage at 64 px and the
  rest at 88 instead of 96, the same accuracy in 20% less time; a zero head instead of timm's
  (whose first logits were so large that the head epoch ended with a validation loss of 5)
  +1.0, and the head epoch at 1e-3 rather than 3e-3 +1 (within the subset's noise). Each also
  makes sense for ResNet-50 (the default backbone here): short fine-tuning on small upsampled
  pictures gains from resolution and from rates high enough to move the body in a few
  thousand steps, loses from regularisers meant for long runs, and any new head is better
  started from uniform predictions. On all 45,000 training photos it reached 86.5% validation top-1 in 431 s
  (a plain fine-tuning loop: 72.6% in 967 s), and with `epochs=3` 88.3% in 793 s, still
  training every layer in its second stage. Keeping the stem and layer1 frozen there (issue 28)
  makes that stage's steps 1.6x as fast, since no backward pass runs through the largest
  feature maps: with `budget_minutes=10` it then fit 1.8 epochs instead of 1.2 and reached
  88.1-88.4% instead of 86.5%.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_type_hints

from ..core import placement, runtime
from ..core.errors import UserError, notice
from ..model.backbones import GROUPS

# preset="auto" without a GPU: 15 minutes is what the `cpu` preset's 2 epochs of EfficientNet-Lite0
# on 45,000 real photos took on a 2-core machine (about 7 minutes) with room for a slower laptop
# or a larger backbone; on those photos a 15-minute budget reached 87.3% (benchmarks/README.md).
AUTO_BUDGET_MINUTES = 15.0


@dataclass(frozen=True)
class Stage:
    name: str
    share: float                  # share of the epochs (any scale; normalised over the stages)
    groups: tuple[str, ...]       # the layer groups trained in this stage
    lr: tuple[float, ...]         # peak learning rate of each group, in the same order
    warmup: float = 0.3           # share of the stage spent rising to the peak (OneCycle pct_start)
    anneal: str = "cos"           # "cos" or "linear"
    epochs: int = 0               # set by scaling to the run's total (with `steps`: its validations)
    image_size: int = 0           # this stage's input size, capped by the run's (0: the run's)
    steps: int = 0                # its length in optimizer steps, which may end inside an epoch (0: whole epochs)


@dataclass(frozen=True)
class Config:
    """Everything a run needs. The names match the notebook's parameters and the CLI's keys."""
    preset: str = "original"      # the recipe: "original", "fast" or "cpu" ("auto" is resolved to one of them)
    epochs: int = 100             # total epochs; the stages share them in proportion
    dataset: str = "cifar100"     # "cifar100", "cifar10", "synthetic" or "folder" (your pictures)
    data_dir: str = "data"        # relative paths are from the project root; for "folder", your pictures
    store_size: int = 32          # "folder": pixels each picture is stored at on the device (CIFAR is 32)
    cache_dir: str = "data"       # "folder": where archives are extracted and decoded pictures cached
    data_on: str = "auto"         # where training pictures live: "auto", "device", "host" (RAM) or "disk" ("folder": the cache)
    order: str = "auto"           # batches' order: "auto", "shuffle", or "block" (quasi-random, for a cache bigger than RAM)
    verify_checksums: bool = True
    backbone: str = "resnet50"    # any torchvision or timm model name
    weights: str = "imagenet"     # "imagenet", "none", or a path to a state_dict file
    image_size: int = 224         # model input size; images are upsampled from 32 px
    batch_size: int = 32          # per process: under torchrun the global batch is N x this
    eval_batch_size: int = 256
    optimizer: str = "sgd"        # "sgd" (Nesterov) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augmentation: str = "original"  # a policy of cifarlib.data.augment
    patience: int = 10            # epochs without a better validation loss before stopping
    stop_ends_run: bool = False   # True: early stopping ends the run; False: only the stage
    cycle_momentum: bool = True   # OneCycleLR's momentum cycling (PyTorch's default)
    device: str = "auto"          # "auto", "cpu", "cuda", "cuda:1", "mps"
    checkpoint_dir: str = "checkpoints"  # runs go to <checkpoint_dir>/<run_name>/
    run_name: str = ""            # "" picks preset-backbone-date-time
    resume: bool = False          # continue checkpoints/<run_name>/last.pt
    overwrite: bool = False       # replace an existing run folder
    seed: int = 0
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    accum_steps: int = 1          # gradient accumulation: batches per optimizer step
    compile: bool = False         # torch.compile the model (CUDA)
    save_every_minutes: float = 10.0  # also save the exact position this often while training (0: off)
    frozen_bn: str = "eval"       # BatchNorm of frozen groups: "eval" keeps pretrained statistics, "train" updates them
    head_init: str = "zero"       # the new classifier: "zero", or "default" (as torchvision or timm makes it)
    precision: str = "auto"       # "auto" (the device's: bf16 or fp16 on CUDA, fp32 elsewhere), "bf16", "fp16" or "fp32"
    fused: bool | str = "auto"    # fused optimizer kernels: "auto" (on CUDA), True or False
    channels_last: bool | str = "auto"  # NHWC memory layout: "auto" (CUDA and CPU), True or False
    check_every: int = 0          # optimizer steps between the loop's checks (0: 1 on the CPU, 50 on a GPU)
    budget_minutes: float = 0     # plan the stages' lengths to end the whole run in this time (0: off; leave epochs unset)
    lr_scale: float = 1.0         # multiplies every stage's learning rates (the preset's ratios kept)
    stages: tuple[Stage, ...] = field(default=())
    plan: dict[str, Any] | None = None  # recorded by training, not set: the resolved device plan
    given: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the settings given (not stored)


# Where a run's files are and what runs it: a resume command's values for these replace the saved
# ones, since a run may continue on another machine, device or plan. Every other setting is the
# run's recipe, which a resumed run keeps.
RESUME_OVERRIDES = ("device", "compile", "data_dir", "cache_dir", "data_on", "checkpoint_dir", "verify_checksums",
                    "save_every_minutes", "precision", "fused", "channels_last", "check_every")
NOT_SETTINGS = ("plan", "given")  # Config fields that training fills in


ORIGINAL_STAGES = (
    Stage("head", 10, ("head",), (0.01,)),
    Stage("top", 15, ("layer3", "layer4", "head"), (5e-4, 1e-3, 5e-3)),
    Stage("all", 75, ("layer1", "layer2", "layer3", "layer4", "head"), (5e-5, 1e-4, 3e-4, 8e-4, 2e-3)),
)

PRESETS: dict[str, dict[str, Any]] = {
    "original": dict(epochs=100, batch_size=32, image_size=224, optimizer="sgd", momentum=0.9,
                     weight_decay=5e-4, augmentation="original", patience=10, stop_ends_run=True,
                     cycle_momentum=True, frozen_bn="train", head_init="default", stages=ORIGINAL_STAGES),
    "fast": dict(epochs=16, batch_size=256, image_size=224, optimizer="sgd", momentum=0.9,
                 weight_decay=5e-5, augmentation="light", patience=4, stop_ends_run=False,
                 cycle_momentum=False, stages=(
                     Stage("head", 1, ("head",), (0.1,), warmup=0.2),
                     Stage("all", 15, GROUPS, (0.004, 0.006, 0.01, 0.016, 0.024, 0.06), warmup=0.15))),
    "cpu": dict(epochs=2, batch_size=64, image_size=88, optimizer="adamw", momentum=0.9,
                weight_decay=0.05, augmentation="crop", patience=2, stop_ends_run=False,
                cycle_momentum=False, frozen_bn="eval", stages=(
                    Stage("head", 1, ("head",), (1e-3,), warmup=0.1, image_size=64),
                    # the stem and layer1 stay frozen: no backward pass through the largest feature
                    # maps, so 1.6x the steps in the same minutes (benchmarks/README.md, trial T3)
                    Stage("top", 2, ("layer2", "layer3", "layer4", "head"), (1.25e-3, 2e-3, 3e-3, 1e-2), warmup=0.1))),
}


def scale_epochs(shares: list[float], total: int) -> list[int]:
    """Split `total` epochs by `shares`: largest remainders, at least one each, summing to total."""
    n = len(shares)
    if total < n:
        raise UserError(f"epochs={total} is fewer than the preset's {n} stages; use at least {n}.")
    exact = [total * s / sum(shares) for s in shares]
    out = [int(e) for e in exact]
    for i in sorted(range(n), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    while min(out) == 0:  # a stage rounded to nothing takes an epoch from the largest
        out[out.index(max(out))] -= 1
        out[out.index(0)] = 1
    return out


def _check_type(key: str, value: Any, hint: Any) -> Any:
    allowed = get_args(hint) or (hint,)  # `int | None` -> (int, NoneType)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise UserError(f"{key} must be {names}, not {value!r} ({type(value).__name__}).")
    return value


def _check_stages(stages: tuple[Stage, ...]) -> None:
    for st in stages:
        if not st.groups:
            raise UserError(f"stage {st.name!r} trains nothing: give it at least one layer group.")
        unknown = [g for g in st.groups if g not in GROUPS]
        if unknown:
            raise UserError(f"stage {st.name!r} names unknown layer group(s) {', '.join(unknown)}; "
                            f"the groups are {', '.join(GROUPS)}.")
        if len(st.lr) != len(st.groups):
            raise UserError(f"stage {st.name!r} has {len(st.lr)} learning rate(s) for {len(st.groups)} "
                            f"group(s) ({', '.join(st.groups)}); give one per group.")
        if not 0 <= st.warmup < 1 or st.anneal not in ("cos", "linear") or st.share <= 0 or st.image_size < 0 or st.steps < 0:
            raise UserError(f"stage {st.name!r}: warmup must be in [0, 1), anneal 'cos' or 'linear', share > 0, "
                            "image_size 0 (the run's) or more, steps 0 (whole epochs) or more.")


def make_config(preset: str = "original", **overrides) -> Config:
    """The preset's recipe with `overrides` applied (None means "the preset's value"), checked,
    and its stages scaled to `epochs`. `preset="auto"`: see the module's docstring."""
    if preset not in (*PRESETS, "auto"):
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}, or auto.")
    hints = {k: v for k, v in get_type_hints(Config).items() if k not in NOT_SETTINGS}
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(hints))}.")
    given = tuple(k for k, v in overrides.items() if v is not None)
    if preset == "auto":
        preset, overrides = _auto(overrides)
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None or k.startswith("max_")}}
    for key, value in values.items():
        if key != "stages":
            values[key] = _check_type(key, value, hints[key])
    for key in ("epochs", "batch_size", "eval_batch_size", "image_size", "accum_steps", "patience", "store_size"):
        if values.get(key, 1) < 1:
            raise UserError(f"{key} must be at least 1, not {values[key]}.")
    if not 0 < values.get("val_fraction", 0.1) < 1:
        raise UserError(f"val_fraction must be above 0 and below 1 for training (early stopping and "
                        f"best.pt need a validation split), not {values['val_fraction']!r}.")
    if values.get("save_every_minutes", 0) < 0:
        raise UserError(f"save_every_minutes must be 0 (off) or more, not {values['save_every_minutes']!r}.")
    if values.get("frozen_bn", "eval") not in ("eval", "train"):
        raise UserError(f"frozen_bn must be 'eval' (frozen BatchNorm keeps its statistics) or 'train' (they "
                        f"keep updating, as under a plain model.train()), not {values['frozen_bn']!r}.")
    if values.get("head_init", "zero") not in ("zero", "default"):
        raise UserError(f"head_init must be 'zero' (uniform first predictions) or 'default' (the model "
                        f"library's own initialisation), not {values['head_init']!r}.")
    if values.get("optimizer", "sgd") not in ("sgd", "adamw"):
        raise UserError(f"optimizer must be 'sgd' or 'adamw', not {values['optimizer']!r}.")
    _check_plan_settings(values)
    if values.get("budget_minutes", 0) < 0 or values.get("lr_scale", 1.0) <= 0:
        raise UserError(f"budget_minutes must be 0 (off) or more, and lr_scale above 0; got "
                        f"budget_minutes={values.get('budget_minutes', 0)!r}, lr_scale={values.get('lr_scale', 1.0)!r}.")
    if values.get("budget_minutes", 0) > 0 and "epochs" in given:
        raise UserError(f"budget_minutes={values['budget_minutes']:g} plans the stages' lengths itself, so epochs must be "
                        f"left unset (it is {values['epochs']!r}). Drop epochs, or set budget_minutes=0 to train for "
                        "a number of epochs.")
    stages = values.pop("stages")
    if isinstance(stages, str):  # from the command line: stages='[{"name": "all", "share": 1, ...}]'
        try:
            stages = json.loads(stages)
        except json.JSONDecodeError as e:
            raise UserError(f"stages must be a JSON list of stages ({e}).") from None
    try:
        stages = tuple(Stage(**s) if isinstance(s, dict) else s for s in stages)
    except TypeError as e:
        raise UserError(f"a stage has an unknown or missing field ({e}); a stage has name, share, groups, lr "
                        "and optionally warmup, anneal, image_size, steps.") from None
    scale = values.get("lr_scale", 1.0)
    stages = tuple(dataclasses.replace(st, groups=tuple(st.groups), lr=tuple(lr * scale for lr in st.lr)) for st in stages)
    _check_stages(stages)
    cfg = Config(preset=preset, given=given, **values)
    total = max(cfg.epochs, len(stages)) if cfg.budget_minutes else cfg.epochs  # a budget plans them in any case
    epochs = scale_epochs([s.share for s in stages], total)
    return dataclasses.replace(cfg, stages=tuple(dataclasses.replace(s, epochs=e) for s, e in zip(stages, epochs)))


def _auto(overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`preset="auto"`: the device's preset, and a budget where that is `cpu` and no length is
    given; said on stderr. A budget set here is the preset's, not a given setting."""
    preset, why = runtime.preset_for(overrides.get("device") or "auto")
    length = overrides.get("epochs") is not None or overrides.get("budget_minutes") is not None
    if preset != "original" and not length:  # the laptop's recipe: a first run ends in a time it states
        overrides = {**overrides, "budget_minutes": AUTO_BUDGET_MINUTES}
        notice(f"preset=auto: {why}, so the cpu preset, with a {AUTO_BUDGET_MINUTES:g}-minute budget (the original "
               "preset's 100 epochs at 224 px would take days here). Give epochs=N or budget_minutes=M for another "
               "length, preset=original, fast or cpu for another recipe.")
    else:
        notice(f"preset=auto: {why}, so the {preset} preset.")
    return preset, overrides


def _check_plan_settings(values: dict[str, Any]) -> None:
    """The device plan's settings, checked for their form; whether the device can run them is
    checked when the plan is resolved (`cifarlib.core.runtime.resolve_plan`)."""
    for key, choices in (("data_on", placement.DATA_ON), ("order", placement.ORDERS)):
        if values.get(key, "auto") not in choices:
            raise UserError(f"{key} must be one of {', '.join(map(repr, choices))}, not {values[key]!r}.")
    if values.get("precision", "auto") not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32', not {values['precision']!r}.")
    for key in ("fused", "channels_last"):
        if values.get(key, "auto") not in ("auto", True, False):
            raise UserError(f"{key} must be 'auto', True or False, not {values[key]!r}.")
    if values.get("check_every", 0) < 0:
        raise UserError(f"check_every must be 0 (the device's choice) or a number of optimizer steps, not {values['check_every']!r}.")


def resumed(saved: dict[str, Any], cfg: Config) -> Config:
    """The config a resumed run continues with: its saved config (`saved`, as config.json and
    last.pt hold it), with the settings of `RESUME_OVERRIDES` that the resume command gave
    (`cfg.given`). A recipe setting given with a value other than both the run's and the
    default (so a notebook's untouched parameters pass) is refused rather than dropped."""
    run = from_dict(saved)
    default = {**dataclasses.asdict(Config()), **PRESETS.get(cfg.preset, {})}
    conflicts = [f"{k}={getattr(cfg, k)!r} (the run's: {getattr(run, k)!r})" for k in cfg.given
                 if k not in RESUME_OVERRIDES and k not in ("run_name", "resume", "overwrite")
                 and getattr(cfg, k) != getattr(run, k) and getattr(cfg, k) != default.get(k)]
    if conflicts:
        raise UserError(f"resume=True continues run {run.run_name!r} with its own recipe, and these settings differ "
                        f"from it: {'; '.join(conflicts)}. Drop them to continue, or start a new run "
                        "(another run_name, or overwrite=True) to train with them.")
    keep = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if k in cfg.given}
    return dataclasses.replace(run, run_name=cfg.run_name, resume=True, given=cfg.given, **keep)  # the folder may be renamed


def stages_table(cfg: Config) -> list[dict[str, Any]]:
    """The stages as notebook 03 shows them before training: each one's epochs, or, in a budgeted
    run, that the budget plans them (its plan, printed once the stages are timed, replaces the
    preset's epochs)."""
    planned = f"planned by the {cfg.budget_minutes:g}-minute budget" if cfg.budget_minutes else None
    return [{"stage": s.name, "epochs": planned or s.epochs, "groups": ", ".join(s.groups), "peak learning rates": s.lr}
            for s in cfg.stages]


def stage_steps(stage: Stage, steps_per_epoch: int) -> int:
    """A stage's length in optimizer steps: its own `steps`, or its epochs'."""
    return stage.steps or stage.epochs * steps_per_epoch


def stage_rows(stage: Stage, steps_per_epoch: int) -> int:
    """How many history rows (validations) a stage writes: one at every epoch boundary inside it
    and one at its end."""
    return -(-stage_steps(stage, steps_per_epoch) // steps_per_epoch)


def stage_image_size(cfg: Config, stage: Stage) -> int:
    """A stage's input size: its own, capped by the run's `image_size` (the size the model ends
    at, and the checkpoint's), or the run's. So `preset=cpu image_size=32` trains at 32 throughout
    and `image_size=128` trains the head at the preset's 64 and the rest at 128."""
    return min(stage.image_size, cfg.image_size) if stage.image_size else cfg.image_size


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON-able values (stored in config.json and in every checkpoint)."""
    d = dataclasses.asdict(cfg)
    del d["given"]
    return d


def from_dict(d: dict[str, Any]) -> Config:
    known = {f.name for f in fields(Config)} - {"given"}
    d = {k: v for k, v in d.items() if k in known}
    d["stages"] = tuple(Stage(**{**s, "groups": tuple(s["groups"]), "lr": tuple(s["lr"])}) for s in d.get("stages", ()))
    return Config(**d)


def parse_value(text: str) -> Any:
    """Read a CLI value as papermill reads `-p`: True/False/None, then int, then float, else str."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
