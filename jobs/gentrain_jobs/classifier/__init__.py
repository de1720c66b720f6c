"""Classifier job type: a small conv net trained on your labelled shards, whose
penultimate layer becomes the feature space of FID, KID, IS and precision/recall
where Inception does not fit (28x28 digits, medical scans, spectrograms, ...).

    gentrain run classifier/debug                       # digits, seconds on a CPU
    gentrain run classifier/mnist                       # your packed MNIST (gentrain data pack ... --out data/mnist)
    gentrain eval runs/gan-mnist --metrics fid,kid,is --extractor classifier:runs/classifier-mnist

Reports name the extractor `classifier:<run>@step-N#<weights digest>`, so numbers under
one classifier are never compared with Inception numbers or another classifier's.
`sample` has no generative meaning here: it draws class visualisations (inputs pushed
by gradient ascent toward each class), a quick look at what the network responds to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain_jobs.classifier.model import ConvClassifier

VISUALISATION_STEPS = 30
VISUALISATION_STEP_SIZE = 0.05  # per step, as a fraction of the input's RMS norm


@dataclass
class ClassifierConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])
    feature_dim: int = field(default=128, metadata=bounds(ge=2, help="width of the feature layer FID uses"))
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0, lt=1))

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be a non-empty list of positive widths")


def build(config: ClassifierConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    if len(data.shape) != 3:
        raise ValueError(f"job type 'classifier' needs image data [C, H, W]; this data set's samples have "
                         f"shape {list(data.shape)}")
    if data.num_classes < 2:
        raise ValueError(f"job type 'classifier' needs labelled data with at least 2 classes; the index has "
                         f"num_classes={data.num_classes}. Pack a source with labels (class subfolders, "
                         "npz with y, MNIST/CIFAR files)")
    return {"classifier": ConvClassifier(data.shape, data.num_classes, config.channels, config.feature_dim,
                                         config.dropout)}


def train_step(ctx, batch) -> dict[str, float]:
    labels = batch["label"]
    with ctx.autocast():
        logits = ctx.module("classifier")(batch["image"])
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=ctx.config.label_smoothing)
    ctx.backward(loss, "classifier")
    stepped = ctx.step("classifier")
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"loss": float(loss.detach()), "accuracy": float(accuracy), **stepped}


@torch.no_grad()
def evaluate(modules, config: ClassifierConfig, batch, generator: torch.Generator) -> dict[str, float]:
    logits = modules["classifier"](batch["image"]).float()
    labels = batch["label"]
    return {"loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(dim=1) == labels).float().mean())}


def sample(modules, config: ClassifierConfig, request: SampleRequest) -> torch.Tensor:
    """Class visualisations: grey noise pushed up each class's logit (request.labels, or the
    classes in turn), kept in [0, 1]."""
    model = modules["classifier"]
    device = next(model.parameters()).device
    n = request.n
    images = (0.5 + 0.1 * torch.randn(n, *model.shape, generator=request.generator)).clamp(0, 1).to(device)
    labels = torch.arange(n) % model.num_classes if request.labels is None else request.labels
    targets = labels.to(device)
    scale = VISUALISATION_STEP_SIZE * math.sqrt(images[0].numel())
    with torch.enable_grad():
        for _ in range(VISUALISATION_STEPS):
            images.requires_grad_(True)
            objective = model(images).float().gather(1, targets[:, None]).sum()
            (gradient,) = torch.autograd.grad(objective, images)
            norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(model.shape)))
            images = (images.detach() + scale * gradient / norms).clamp(0, 1)
    return images.detach()


JOB = JobType(
    name="classifier",
    config=ClassifierConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    generative=False,  # sample() draws class visualisations, not data: no FID/KID/IS/PR
    class_conditional=True,  # of the classes in request.labels
    # A few-MB conv net: DDP is all it needs; other strategies add test time, not capability.
    supports=Supports(strategies=("ddp", "fsdp"), precisions=("fp32", "bf16")),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Conv classifier on labelled shards; its penultimate features are a FID/KID/IS/PR "
                "extractor for domains where Inception does not fit (--extractor classifier:RUN)",
)
