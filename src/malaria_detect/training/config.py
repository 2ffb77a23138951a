"""The training configuration, in one place: `train` runs on it, it is saved in every run folder
(config.json) and in every model's record, and the command line builds the options of `train` and
`cv` from it (each field's default and help), so no default is written twice.

Torch-free: the command line imports it without PyTorch.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

ARCHITECTURES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "simple_cnn")


def _opt(default, help: str, **cli):
    """A field with its command-line help (and, in `cli`, a flag name, a type, choices, ...)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "folder with Parasitized/ and Uninfected/ subfolders"})
    out: str = field(metadata={"help": "run folder, e.g. runs/lite0"})
    model: str = _opt("efficientnet_lite0", "architecture", choices=ARCHITECTURES)
    pretrained: bool = _opt(True, "start from random weights instead of ImageNet", flag="--no-pretrained")
    image_size: int = _opt(112, "network input side in pixels")
    batch_size: int = _opt(64, "images per optimizer step (over all processes under torchrun)")
    head_epochs: int = _opt(1, "stage 1: frozen backbone, head only")
    epochs: int = _opt(5, "stage 2: fine-tuning epochs (the scratch model trains only this stage)")
    lr_head: float = _opt(3e-3, "stage 1 learning rate")
    lr: float = _opt(1e-3, "fine-tuning peak learning rate (cosine decay, warm-up over the first 100 steps)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    finetune_blocks: int = _opt(0, "0 = fine-tune all layers; N = only the top N blocks and the conv head")
    label_smoothing: float = _opt(0.05, "label smoothing of the targets")
    dropout: float = _opt(0.2, "dropout before the linear head")
    patience: int = _opt(3, "early stopping: fine-tuning epochs without a better validation ROC-AUC")
    seed: int = _opt(0, "seed of the split, the initialisation and the augmentation")
    split: list = field(default_factory=lambda: [0.7, 0.1, 0.2],
                        metadata={"help": "fractions of patients for train, val and test", "nargs": 3,
                                  "type": float, "metavar": ("TRAIN", "VAL", "TEST")})
    split_file: str | None = _opt(None, "reuse a saved split.json (e.g. the shipped model's: same test patients)",
                                  type=str)
    patients_csv: str | None = _opt(None, "CSV file,patient for data without NIH file names", flag="--patients",
                                    type=str)
    max_train_images: int = _opt(0, "subsample training images (quick runs; 0 = all)")
    target_sensitivity: float | None = _opt(None, "set the threshold for this validation sensitivity "
                                                  "(default: max balanced accuracy)", type=float)
    workers: int = _opt(2, "image-decoding threads")
    threads: int = _opt(0, "torch threads (0 = all cores)")
    robust_aug: bool = _opt(False, "also stain (optical density), gamma, blur and scale jitter: for other labs")
    lab_stain_aug: float = _opt(0.0, "share of training images shown as another lab's cell (lab_stain: broad stain, "
                                     "colour and background variation)")
    ood_stain_views: int = _opt(0, "fit the not-a-cell flag also on N stain-varied views of each cell (lab_stain), "
                                   "so that other labs' cells pass: 0 = the cells as they are")


def default(name: str):
    """The default of a TrainConfig field."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class DetConfig:
    """The options of `train-detector` (training/detector.py)."""

    data: str = _opt("../shared/data", "folder holding iml-fields/ and txl-pbc/ (annotations.json + images/)")
    out: str = _opt("runs/det", "run folder: checkpoints, state.json, log")
    steps: int = _opt(3000, "optimizer steps (cosine decay after a 100-step warm-up)")
    batch_size: int = _opt(16, "crops per step")
    crop: int = _opt(224, "training crop side, pixels (a multiple of 16)")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    cell_min: float = _opt(28.0, "smallest median red-cell size of a training crop, pixels")
    cell_max: float = _opt(80.0, "largest median red-cell size of a training crop, pixels")
    iml_share: float = _opt(0.4, "share of the crops cut from IML fields (the rest from TXL-PBC)")
    val_every: int = _opt(250, "validate and checkpoint every N steps")
    seed: int = _opt(0, "seed of the sampling and the augmentation")
    threads: int = _opt(0, "torch threads (0 = all cores)")
    pretrained: bool = _opt(True, "start from random weights instead of ImageNet", flag="--no-pretrained")


@dataclass
class HeadsConfig:
    """The options of `train-heads` (training/heads.py): one classifier for every object, on a cell
    model's backbone."""

    base: str = _opt("robust", "the cell model whose backbone and not-a-cell flag are kept: a bundled name or "
                               "an .onnx file")
    data: str = _opt("../shared/data", "folder holding nih-cells/, iml-fields/ and txl-pbc/")
    out: str = _opt("runs/anylab", "run folder: crops.npz, features.npz, model.onnx, metrics.json")
    nih_split: str = _opt("recipes/nih_split.json", "the NIH patient split (its train and val patients are read; "
                                                    "never its test patients)")
    nih_per_class: int = _opt(100_000, "NIH training cells per class (more than there are: all of them)")
    iml_learn: str = _opt("PA171690-769", "IML fields to learn from (a block of image numbers; never PA171830-899)")
    iml_choose: str = _opt("PA171770-799", "IML fields whose crops give the validation figures (a block apart from "
                                           "--iml-learn's; never PA171830-899)")
    iml_uninfected: int = _opt(4000, "IML uninfected training cells (every infected one is used)")
    infected_views: int = _opt(6, "jittered views of each IML infected training cell (the stages are few)")
    txl_red_per_field: int = _opt(5, "TXL-PBC red cells per training field")
    lookalikes: int = _opt(6000, "synthetic look-alikes: platelets on red cells, precipitate, dust, white-cell "
                                 "fragments (a quarter each)")
    background: int = _opt(1500, "background crops of TXL-PBC training fields (kind 'other'): max(1, N // 800) a "
                                 "field, where one fits between the boxes")
    steps: int = _opt(600, "optimizer steps (full batch, AdamW, cosine decay)")
    lr: float = _opt(0.01, "learning rate")
    weight_decay: float = _opt(1e-3, "AdamW weight decay")
    lookalike_weight: float = _opt(1.0, "loss weight of look-alikes, white cells and platelets in the "
                                        "parasitized head, relative to red cells of their source")
    anchor: float = _opt(0.3, "pull of the parasitized head towards the base model's own, which it starts from "
                              "(0: no pull)")
    hidden: int = _opt(64, "hidden units of the stage head (0: linear; the others are linear)")
    stain_norm: bool = _opt(False, "bring each IML and TXL-PBC field's stain and lamp to the reference before "
                                   "cutting its crops (fields/stain.py); the model's record then asks the "
                                   "whole-field path to do the same")
    cell_shapes: int = _opt(0, "more look-alikes: uninfected red cells made crenated (burr cells) or target cells, "
                               "half each (training/redcells.py; 0: none)")
    seed: int = _opt(0, "seed of the sampling and the look-alikes")
    finetune_epochs: int = _opt(0, "epochs of fine-tuning a copy of the base's last stages (blocks 8-15) with the "
                                   "heads, end to end on augmented crops, for the whole-field path (0: heads on "
                                   "the frozen features only); checkpointed every epoch in OUT/finetune/")
    finetune_lr: float = _opt(1e-4, "learning rate of the fine-tuned stages (the heads: 10 x)")
    finetune_lab_share: float = _opt(0.3, "share of the fine-tuning views shown in another lab's stain (lab_stain; "
                                          "every view also gets flips, rotations, stain, lamp, blur and zoom jitter)")
