"""Experiment specs: typed, frozen pydantic models (reading, writing and overriding them: `spec_io`).

Every knob of a run lives here with a default, a range check and a description. The defaults are the
built-in experiment (`experiments/shapes.yaml`): CenterNet-R18 trained from scratch on the synthetic
shapes dataset. This module must not import torch (`centerpoint --help` and `spec show` stay fast).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# mmdetection's CenterNet-R18 network (the COCO recipes): ModelSpec(**MMDET_R18, num_classes=80).
MMDET_R18 = {"width": 64, "neck_channels": (256, 128, 64), "head_channels": 64}
# Pillow's default decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS): about a 9459 x 9459 image.
PILLOW_MAX_PIXELS = 89_478_485


# Types shared by the fields below: one rule each, not one check per field.
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]  # torch.manual_seed takes at most 64 bits
Channels = Annotated[int, Field(ge=1, le=4096)]
Positive = Annotated[float, Field(gt=0.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # an exponential moving average's decay


class _Spec(BaseModel):
    # allow_inf_nan=False: every float field (tuples included) rejects NaN and +-inf, which no knob of a run
    # can mean (YAML's .nan/.inf and --set x=nan or 1e400 arrive here as such floats).
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL byte in a path or name would fail only later, inside the OS call, as a ValueError.
        if isinstance(value, (str, Path)) and "\x00" in str(value):
            raise ValueError("must not contain a NUL character")
        return value


class CenterCropSpec(_Spec):
    """mmdetection's RandomCenterCropPad training crop: a square window of int(input_size * ratio) original
    pixels around a random centre that keeps a box centre, resized to input_size (see transforms.py)."""

    ratios: tuple[float, ...] = Field(
        (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
        description="Window sides as multiples of input_size (mmdetection's `ratios`): one is drawn uniformly, "
        "and again after 50 centres that keep no box; above 1 zooms out, below 1 zooms in.",
    )
    border: int = Field(
        128,
        ge=0,
        description="Margin, original pixels, between a window centre and the image edges "
        "(mmdetection's `border`; divided by a power of two on image sides of 2 * border or less).",
    )

    @model_validator(mode="after")
    def _check(self) -> CenterCropSpec:
        if not self.ratios or not all(0 < r < math.inf for r in self.ratios):  # rejects nan too
            raise ValueError(f"ratios must be a non-empty list of positive numbers, got {list(self.ratios)}")
        return self


class DataSpec(_Spec):
    dataset: Literal["shapes", "coco"] = Field(
        "shapes", description="'shapes': the built-in synthetic dataset, generated once into a cache dir; "
        "'coco': a COCO-format dataset under `root`.")
    root: Path | None = Field(None, description="Dataset root. None with dataset=shapes: the cache directory "
                              "($CENTERPOINT_CACHE or ~/.cache/centerpoint).")
    train_ann: str = Field("annotations/instances_train.json", description="Train annotations, relative to root.")
    train_images: str = Field("train", description="Train image directory, relative to root.")
    val_ann: str = Field("annotations/instances_val.json", description="Validation annotations, relative to root.")
    val_images: str = Field("val", description="Validation image directory, relative to root.")
    shapes_train: int = Field(3000, ge=1, le=1_000_000, description="Synthetic train images (dataset=shapes).")
    shapes_val: int = Field(300, ge=1, le=1_000_000, description="Synthetic val images (dataset=shapes).")
    shapes_seed: Seed = Field(0, description="Seed of the synthetic dataset (dataset=shapes).")
    input_size: int = Field(128, ge=32, le=2048, multiple_of=32,
                            description="Side of the square training crop, input pixels.")
    test_size: int | None = Field(
        192, ge=32, le=4096, multiple_of=32, description="test_mode=resize: the longer image side at test time, "
        "input pixels (None: input_size). Training rescales are drawn relative to it (to the native resolution "
        "with test_mode=pad), so objects have the same size in training crops as at test time.")
    test_mode: Literal["resize", "pad"] = Field(
        "resize", description="'resize': keep-ratio resize the longer side to `input_size` and centre-pad to a "
        "square; 'pad': keep the original resolution and pad each side to (side | 31) + 1 with the image's pixel "
        "side // 2 on the input's pixel out // 2 (mmdetection's test padding).")
    scale_range: tuple[float, float] = Field(
        (0.75, 1.3),
        description="Random rescale range of training images relative to their test-time scale, "
        "drawn uniformly, with the input_size window placed uniformly. Unused when `center_crop` is set.",
    )
    center_crop: CenterCropSpec | None = Field(
        None,
        description="mmdetection's RandomCenterCropPad (train mode, zero padding) followed by a keep-ratio "
        "resize to input_size, instead of the `scale_range` rescale; the COCO recipes use it. None: off.",
    )
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability in training.")
    photometric: bool = Field(False, description="Photometric distortion in training (brightness, contrast, "
                              "saturation, hue, channel swap).")
    min_image_size: int = Field(0, ge=0, description="Training images whose shorter side is below this many "
                                "pixels are left out (mmdetection's COCO filter: 32).")
    min_box_size: float = Field(1.0, ge=0.0, description="Training boxes smaller than this side (input pixels, "
                                "after augmentation) are dropped.")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel RGB mean, 0..255 units.")
    std: tuple[Positive, Positive, Positive] = Field(IMAGENET_STD, description="Per-channel RGB std, 0..255 units "
                                                     "(each > 0: images are divided by it).")
    workers: int | None = Field(
        None, ge=0, le=64, description="Data loader worker processes per device. None (auto): 4 on cuda and "
        "sdaa; 0 on cpu, where the step's threads already use every core and a worker process only contends "
        "with them (measured on 2 cores: the built-in experiment takes 381 s with 1 worker, 341 s with 0).")
    augment_on: Literal["auto", "workers", "device"] = Field(
        "auto", description="Where training images are warped, colour-distorted and get their targets: "
        "'workers' (the data loader processes, image by image), 'device' (batched on the training device after "
        "the copy; workers then only decode, and a sixth of the bytes crosses to the device), 'auto': device "
        "on cuda, workers on cpu (where it would take cores from the step) and sdaa.")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="A missing or undecodable image, or one "
                                                  "over max_image_pixels: stop with an error, or skip it and count it.")
    max_image_pixels: int = Field(
        PILLOW_MAX_PIXELS, ge=1, le=2**40, description="Images whose header claims more pixels (width x height) "
        "are bad images (see on_bad_image), checked before decoding: a guard against decompression bombs. "
        "Default: Pillow's own limit; a larger value also raises Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS).")

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if self.center_crop is not None and int(self.input_size * min(self.center_crop.ratios)) < 1:
            raise ValueError(
                f"center_crop.ratios: {min(self.center_crop.ratios)} x input_size {self.input_size} "
                "is a window under one pixel"
            )
        return self


class ModelSpec(_Spec):
    depth: Literal[18, 34, 50] = Field(18, description="ResNet depth of the backbone.")
    # The defaults are the built-in experiment's CenterNet-R18 at half width (3.6M parameters, 3.8x fewer
    # FLOPs than the standard network), which trains from scratch on a CPU in minutes. mmdetection's
    # CenterNet-R18 (the COCO recipes, pretrained weights) is width 64, neck 256/128/64, head 64.
    width: int = Field(32, ge=8, le=256, multiple_of=8, description="Filters of the ResNet stem; its stages "
                       "use 1, 2, 4, 8 times this. 64 is the standard network (and what pretrained weights need).")
    num_classes: int | None = Field(
        5, ge=1, le=10_000, description="Object classes, as many as the dataset has. None (the default with "
        "dataset=coco): the number of categories in the train annotations. 5: the built-in dataset's.")
    neck_channels: tuple[Channels, Channels, Channels] = Field(
        (128, 64, 32), description="Filters of the 3 upsampling stages (mmdetection: 256, 128, 64).")
    head_channels: Channels = Field(32, description="Hidden filters of each head branch (mmdetection: 64).")
    dcn: bool = Field(False, description="Modulated deformable convolutions (DCNv2) in the neck's 3x3 convs.")
    zero_init_residual: bool = Field(False, description="Start the last BatchNorm weight of every residual block "
                                     "at 0, so each block starts as the identity: mmdetection's ResNet default, on in "
                                     "the COCO recipes (pretrained weights replace it). Off here: the built-in "
                                     "experiment's 16 epochs from scratch reach 0.58 bbox_mAP without it, 0.41 with.")
    pretrained: Path | None = Field(None, description="torchvision ResNet checkpoint (.pth) for the backbone.")
    init_from: Path | None = Field(
        None, description="Fine-tune: start from this centerpoint checkpoint (.safetensors; an mmdetection one "
        "after `centerpoint checkpoint import`). Every tensor whose name and shape match is loaded (over "
        "`pretrained`); the heatmap head's last layer starts afresh when the class count differs.")

    @property
    def stride(self) -> int:
        """Input pixels per output feature-map cell."""
        return 4


class LossSpec(_Spec):
    heatmap_weight: float = Field(1.0, ge=0.0, description="Weight of the gaussian focal loss.")
    wh_weight: float = Field(0.1, ge=0.0, description="Weight of the L1 box-size loss.")
    offset_weight: float = Field(1.0, ge=0.0, description="Weight of the L1 centre-offset loss.")
    alpha: float = Field(2.0, ge=0.0, description="Focal loss exponent on the prediction.")
    gamma: float = Field(4.0, ge=0.0, description="Focal loss exponent on (1 - target) of negatives.")
    min_overlap: float = Field(0.3, gt=0.0, lt=1.0, description="IoU that sets the gaussian radius.")


class OptimSpec(_Spec):
    name: Literal["sgd", "adam", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="Peak learning rate at `base_batch` images per step.")
    base_batch: int | None = Field(None, ge=1, description="Global batch the lr is set for; when the run's "
                                   "global batch differs the lr is scaled linearly. None: no scaling.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    weight_decay: float = Field(1e-4, ge=0.0, description="Weight decay (coupled for sgd/adam, decoupled adamw).")
    decay_norm_and_bias: bool = Field(False, description="Also decay norm weights and biases (mmdetection does).")
    grad_clip: float | None = Field(35.0, gt=0.0, description="Max global gradient norm; None disables.")


class ScheduleSpec(_Spec):
    kind: Literal["constant", "multistep", "cosine"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup length, steps.")
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0, description="Warmup starts at lr * ratio.")
    milestones: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        (), description="Epochs (>= 0) at which multistep multiplies the lr by gamma.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Multistep decay factor.")
    final_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Cosine ends at lr * final_ratio.")


# Hyperparameters that `train.sweep` can vary over replicas: the optimizer holds them as state tensors.
SWEEP_KEYS = ("optim.lr", "optim.weight_decay")
SweepKey = Literal["optim.lr", "optim.weight_decay"]


class TrainSpec(_Spec):
    epochs: int = Field(16, ge=1, le=100_000, description="Epochs (full passes over the train set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    batch_size: int = Field(16, ge=1, le=4096, description="Images per device per step.")
    seed: Seed = Field(0, description="Seed of init, shuffling and augmentation (0 .. 2**64 - 1).")
    log_every: int = Field(20, ge=1, description="Steps between TensorBoard scalar writes.")
    eval_every: int = Field(4, ge=0, description="Epochs between evaluations (0: only at the end).")
    checkpoint_every: int = Field(1, ge=0, description="Epochs between kept checkpoints (0: only the last).")
    checkpoint_every_steps: int = Field(0, ge=0, description="Also save `latest` every N steps (0: off).")
    keep_last: int = Field(3, ge=1, description="Periodic checkpoints kept besides `latest` and `best`.")
    nonfinite: Literal["skip", "stop"] = Field("skip", description="A NaN/inf loss or gradient: skip the "
                                               "update and count it, or stop the run.")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="Keep an exponential moving average of "
                                    "the weights with this decay (1 - mmdetection's EMA `momentum`; YOLOX: "
                                    "0.9999), evaluated, checkpointed and used by eval/predict. null: off.")
    ema_warmup: float = Field(2000.0, gt=0.0, description="With ema_decay: the EMA's warm-up in updates "
                              "(mmdetection's ExpMomentumEMA `gamma`): update k weighs the new weights by "
                              "(1 - decay) + decay * exp(-k / ema_warmup).")
    init_seed: Seed | None = Field(None, description="Seed of the model's initial weights (None: `seed`); "
                                   "replica i of a replicated run starts from init_seed + i.")
    replicas: int = Field(1, ge=1, le=64, description="Independent models trained together in one step "
                          "(torch.func.vmap over their stacked state): same batches, init seeds init_seed + i, "
                          "and the values of `sweep`. 1: one model, the ordinary run.")
    sweep: dict[SweepKey, tuple[float, ...]] = Field(
        {}, description="Per-replica values of hyperparameters, one per replica (e.g. {'optim.lr': [0.001, "
        "0.002, 0.004]} with replicas=3); keys: " + ", ".join(SWEEP_KEYS) + ".")

    @model_validator(mode="after")
    def _check_replicas(self) -> TrainSpec:
        for key, values in self.sweep.items():
            if len(values) != self.replicas:
                raise ValueError(f"sweep {key} has {len(values)} values but train.replicas is {self.replicas}: give "
                                 "one value per replica")
        if (self.init_seed if self.init_seed is not None else self.seed) + self.replicas - 1 > 2**64 - 1:
            raise ValueError("init seed + replicas - 1 must stay below 2**64")
        return self


class EvalSpec(_Spec):
    batch_size: int = Field(16, ge=1, le=4096, description="Images per device per inference batch.")
    topk: int = Field(100, ge=1, le=1000, description="Detections kept per image.")
    score_threshold: float = Field(0.0, ge=0.0, le=1.0, description="Detections below this score are dropped.")
    backend: Literal["pycocotools", "faster-coco-eval"] = Field("pycocotools", description="COCOeval engine.")
    clip_boxes: bool = Field(False, description="Clip detections to their image and drop those left without "
                             "area before COCOeval. Off: boxes are scored as the model gives them, as "
                             "mmdetection's CocoMetric does (clipping raises IoU with boxes inside the image, "
                             "and the AP with it).")
    flip_test: bool = Field(True, description="Average the heatmaps of the image and its mirror.")
    max_images: int | None = Field(None, ge=1, description="Evaluate only the first N images (quick checks).")
    num_visualize: int = Field(4, ge=0, le=64, description="Validation images with boxes sent to TensorBoard.")


class RuntimeSpec(_Spec):
    device: Literal["auto", "cpu", "cuda", "sdaa"] = Field("auto", description="auto: cuda, else sdaa, else cpu.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the step. auto: on for "
                                                  "cuda, off for cpu (gains little there) and sdaa (eager until "
                                                  "a card has been measured compiled).")
    compile_backend: str | None = Field(None, min_length=1, description="torch.compile backend with compile on "
                                        "(None: the device's, inductor; names come from "
                                        "torch._dynamo.list_backends()).")
    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML reads a bare `on` / `off` as a boolean (in files and in --set runtime.compile=on).
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype of the forward pass (loss stays fp32). auto: bf16 where the device "
        "computes it natively (recent cpus, cuda), else fp32.")
    loss_scale: float = Field(65536.0, gt=0.0, description="precision=fp16: initial dynamic loss scale. It halves "
                              "on every step whose scaled gradients overflow (that update is skipped) and doubles "
                              "after `loss_scale_growth_interval` good steps in a row (torch GradScaler's rule).")
    loss_scale_growth_interval: int = Field(2000, ge=1, description="precision=fp16: good steps before the loss "
                                            "scale doubles.")
    channels_last: bool = Field(True, description="Channels-last memory format for images and conv weights "
                                "(faster bf16 convolutions on cpu).")
    threads: int | None = Field(None, ge=1, le=4096, description="torch intra-op threads (None: torch's default).")
    sync_bn: bool = Field(False, description="Synchronised BatchNorm with several processes: training batch "
                          "statistics over the global batch (all ranks) instead of each rank's own images; two "
                          "small all-reduces per BatchNorm layer in the forward and two in the backward.")


class LoggingSpec(_Spec):
    workdir: Path = Field(Path("runs/shapes"), description="Run directory: spec, checkpoints, logs, metrics. A spec "
                          "file that does not set it trains into runs/<spec file name without .yaml>.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    progress: bool = Field(True, description="Show progress bars.")


class ResolvedSpec(_Spec):
    """What a run's `auto` settings resolved to on the machine that trained it. `centerpoint train` writes it
    into the run's spec.yaml, checkpoints and TensorBoard; training from such a file again uses these values
    wherever the setting is still `auto` (and says so when this machine cannot)."""

    device: Literal["cpu", "cuda", "sdaa"] = Field(description="runtime.device used.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(description="runtime.precision used.")
    compile: Literal["on", "off"] = Field(description="runtime.compile used.")
    workers: int = Field(ge=0, le=64, description="data.workers used (loader processes per device).")
    augment_on: Literal["workers", "device"] = Field(description="data.augment_on used.")

    # the same bare YAML on / off reading as runtime.compile
    _yaml_on_off = field_validator("compile", mode="before")(RuntimeSpec._yaml_on_off.__func__)


class ExperimentSpec(_Spec):
    name: str = Field("shapes_r18", min_length=1, description="Experiment name.")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    logging: LoggingSpec = LoggingSpec()
    resolved: ResolvedSpec | None = Field(
        None, description="Filled in by `centerpoint train`: what the auto settings resolved to on the machine that "
        "ran. Rerunning the file uses them where a setting is still auto; null resolves afresh.")

    @model_validator(mode="before")
    @classmethod
    def _coco_classes(cls, data: Any) -> Any:
        # With dataset=coco a model section that leaves num_classes out counts the classes of the data (null).
        section, model = (data.get("data"), data.get("model")) if isinstance(data, dict) else (None, 0)
        dataset = section.get("dataset") if isinstance(section, dict) else getattr(section, "dataset", None)
        if dataset != "coco" or not isinstance(model, (dict, ModelSpec, type(None))):
            return data
        if isinstance(model, ModelSpec):
            given = "num_classes" in model.model_fields_set
            model = model.model_dump(exclude_unset=True)
        else:
            model = model or {}
            given = "num_classes" in model
        return data if given else {**data, "model": {**model, "num_classes": None}}

    @model_validator(mode="after")
    def _check_sweep(self) -> ExperimentSpec:
        # Each swept value must be one the optimizer's own field accepts (lr in (0, 10], weight decay >= 0).
        for key, values in self.train.sweep.items():
            field = key.split(".", 1)[1]
            for value in values:
                try:
                    OptimSpec.model_validate({**self.optim.model_dump(), field: value})
                except ValidationError as err:
                    raise ValueError(f"sweep {key} value {value!r}: {err.errors()[0]['msg']}") from None
        return self
