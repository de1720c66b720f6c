"""Gated PixelCNN job type (van den Oord et al. 2016): an exact likelihood of the pixels.

    gentrain run pixelcnn/debug
    gentrain run pixelcnn/debug job.config.head=logistic_mixture
    gentrain run pixelcnn/debug job.config.class_conditional=true
    gentrain sample runs/pixelcnn-debug --labels 3 --set temperature=0.9 --out threes.png
    gentrain eval runs/pixelcnn-debug --metrics nll

Heads: a 256-way softmax per sub-pixel (R, then G | R, then B | R, G), a discretized
logistic mixture (PixelCNN++), or a Bernoulli per pixel of binarized images. evaluate
gives the held-out negative log-likelihood per image in nats (`nll`) and per sub-pixel in
bits (`bits_per_dim`); binarized MNIST is reported in nats, 8-bit images in bits/dim.
The visuals complete the lower half of held-out images from their upper half.

Files: model.py (masked convolutions, the gated stacks), likelihoods.py (heads, NLL),
sampling.py (ancestral sampling with a per-row cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.launch.console import worker_print
from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain.visual import inpainting_grid
from gentrain_jobs.pixelcnn import sampling
from gentrain_jobs.pixelcnn.likelihoods import (bits_per_dim, log_prob, network_groups, network_input,
                                                num_levels, output_channels, to_levels)
from gentrain_jobs.pixelcnn.model import GatedPixelCNN

INPAINT_SEED = 0


@dataclass
class PixelCNNConfig:
    head: Literal["softmax", "logistic_mixture", "bernoulli"] = "softmax"
    binarize: bool = field(default=False, metadata={
        "help": "pixels above one half become 1, the rest 0 (binarized MNIST); needs head: bernoulli"})
    width: int = field(default=64, metadata=bounds(
        ge=1, help="feature maps of each stack; a multiple of the image channels (R, G, B groups)"))
    layers: int = field(default=7, metadata=bounds(ge=1, help="gated layers; the first has the type A mask"))
    kernel_size: int = field(default=5, metadata=bounds(
        ge=3, help="odd; vertical (k//2+1) x k, horizontal 1 x (k//2+1)"))
    first_kernel_size: int = field(default=7, metadata=bounds(ge=3, help="odd; the first layer's"))
    head_width: int = field(default=256, metadata=bounds(ge=1, help="hidden 1x1 layer of the output head"))
    mixtures: int = field(default=10, metadata=bounds(ge=1, help="logistic_mixture: components per pixel"))
    class_conditional: bool = field(default=False, metadata={
        "help": "a label embedding in every gate; sampling honours --labels"})
    ema_decay: float = field(default=0.0, metadata=bounds(
        ge=0, lt=1, help="Polyak averaging of the weights for evaluation and sampling; 0 turns it off"))

    def __post_init__(self):
        for name in ("kernel_size", "first_kernel_size"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"job.config.{name}: {getattr(self, name)} must be odd (3, 5, 7, ...)")
        if self.binarize != (self.head == "bernoulli"):
            raise ValueError(f"job.config.binarize is {str(self.binarize).lower()} with head "
                             f"{self.head!r}: binarized images need head: bernoulli, and the Bernoulli "
                             "head needs binarize: true; use both or neither")


@dataclass(frozen=True)
class PixelCNNSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    temperature: float = field(default=1.0, metadata=bounds(
        gt=0, help="divides the logits (and scales the logistics): below 1 gives more typical pixels"))
    chunk: int = field(default=256, metadata=bounds(ge=1, help="images drawn at once; memory grows with it"))


def build(config: PixelCNNConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    if len(data.shape) != 3:
        raise ValueError(f"job type 'pixelcnn' needs image data [C, H, W]; the data's samples have "
                         f"shape {list(data.shape)}")
    channels = data.shape[0]
    groups = network_groups(config.head, channels)
    for name in ("width", "head_width"):
        value = getattr(config, name)
        if value % groups:
            raise ValueError(f"job.config.{name}: {value} is not a multiple of the {groups} image channels "
                             f"(each colour gets an equal share); use {value - value % groups + groups}")
    if config.class_conditional and data.num_classes < 1:
        raise ValueError("job.config.class_conditional is true but the data set has no labels "
                         "(num_classes=0); set it to false or pack labelled data")
    model = GatedPixelCNN(tuple(data.shape), output_channels(config.head, channels, config.mixtures),
                          width=config.width, layers=config.layers, kernel=config.kernel_size,
                          first_kernel=config.first_kernel_size, head_width=config.head_width, groups=groups,
                          num_classes=data.num_classes if config.class_conditional else 0)
    return {"pixelcnn": model}


def _labels(config: PixelCNNConfig, batch) -> torch.Tensor | None:
    return batch["label"] if config.class_conditional else None


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    levels = to_levels(batch["image"], config.binarize)
    with ctx.autocast():
        output = ctx.module("pixelcnn")(network_input(levels, num_levels(config.head)), _labels(config, batch))
    nll = -log_prob(config.head, output, levels, config.mixtures)  # nats per image, fp32
    loss = bits_per_dim(nll, levels[0].numel()).mean()  # per dimension: the lr does not depend on the size
    ctx.backward(loss, "pixelcnn")
    stepped = ctx.step("pixelcnn")
    if config.ema_decay > 0:
        ctx.ema_update("pixelcnn", config.ema_decay)
    return {"loss": float(loss.detach()), "nll": float(nll.detach().mean()), **stepped}


def negative_log_likelihood(modules, config: PixelCNNConfig, batch) -> torch.Tensor:
    """-log p(image) in nats, one per image [B]."""
    levels = to_levels(batch["image"], config.binarize)
    output = modules["pixelcnn"](network_input(levels, num_levels(config.head)), _labels(config, batch))
    return -log_prob(config.head, output, levels, config.mixtures)


@torch.no_grad()
def evaluate(modules, config: PixelCNNConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Held-out NLL: nats per image (binarized MNIST's unit) and bits per sub-pixel."""
    nll = negative_log_likelihood(modules, config, batch)
    return {"nll": float(nll.mean()), "bits_per_dim": float(bits_per_dim(nll, batch["image"][0].numel()).mean())}


@torch.no_grad()
def score(modules, config: PixelCNNConfig, batch) -> dict[str, torch.Tensor]:
    """Per-image NLL in nats for `gentrain score` (lower = more typical)."""
    return {"nll": negative_log_likelihood(modules, config, batch)}


def _draw(model, config: PixelCNNConfig, levels, labels, generator, settings, first_row: int = 0):
    return sampling.ancestral(model, config.head, levels, labels, generator, mixtures=config.mixtures,
                              temperature=settings.temperature, first_row=first_row)


@torch.no_grad()
def sample(modules, config: PixelCNNConfig, request: SampleRequest) -> torch.Tensor:
    """Ancestral samples in [0, 1]; class-conditional models take request.labels (or draw
    classes uniformly). Prints the rate (samples/s) of every call."""
    model = modules["pixelcnn"]
    device = next(model.parameters()).device
    shape = model.shape
    labels = request.labels
    if labels is not None and not model.num_classes:
        raise ValueError("labels given, but this PixelCNN was trained without job.config.class_conditional: "
                         "true, so it cannot sample by class; leave the labels out")
    if model.num_classes and labels is None:
        labels = torch.randint(0, model.num_classes, (request.n,), generator=request.generator)
    started = time.perf_counter()
    chunks = []
    for start in range(0, request.n, request.settings.chunk):
        n = min(request.settings.chunk, request.n - start)
        chunk_labels = None if labels is None else labels[start:start + n].to(device)
        empty = torch.zeros(n, *shape, dtype=torch.long, device=device)
        chunks.append(_draw(model, config, empty, chunk_labels, request.generator, request.settings))
    levels = torch.cat(chunks)
    seconds = time.perf_counter() - started
    runs = sampling.network_evaluations(config.head, shape)
    worker_print(f"pixelcnn sample: {request.n} images {'x'.join(map(str, shape))} in {seconds:.2f} s "
                 f"({request.n / max(seconds, 1e-9):.1f} samples/s; per image pass the vertical stack "
                 f"ran {runs['vertical']} times, the one-row horizontal stack {runs['horizontal_row']})")
    return levels.float() / (num_levels(config.head) - 1)


@torch.no_grad()
def inpaint(modules, config: PixelCNNConfig, images: torch.Tensor, labels, generator,
            settings: PixelCNNSampler = PixelCNNSampler()) -> torch.Tensor:
    """The lower half of each image [n, C, H, W] drawn given its upper half, in [0, 1]."""
    levels = to_levels(images, config.binarize)
    top = images.shape[2] // 2
    completed = _draw(modules["pixelcnn"], config, levels, labels, generator, settings, first_row=top)
    return completed.float() / (num_levels(config.head) - 1)


@torch.no_grad()
def visuals(modules, config: PixelCNNConfig, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """inpainting: (original, lower half masked grey, completion) triples, two per grid row."""
    images = batch["image"]
    count = 12 if len(images) >= 12 else min(len(images), 3)  # 36 or 9 images: a triple never wraps
    if count == 0:
        return {}
    images = images[:count]
    labels = _labels(config, batch)
    labels = None if labels is None else labels[:count]
    originals = to_levels(images, config.binarize).float() / (num_levels(config.head) - 1)
    masked = originals.clone()
    masked[:, :, images.shape[2] // 2:] = 0.5
    if generator is None:  # called outside an evaluation: a fixed seed, never the global RNG
        generator = torch.Generator().manual_seed(INPAINT_SEED)
    completed = inpaint(modules, config, images, labels, generator)
    return {"inpainting": inpainting_grid(originals, masked, completed)}


JOB = JobType(
    name="pixelcnn",
    config=PixelCNNConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    visuals=visuals,
    score=score,
    sampler=PixelCNNSampler,
    # Exact log-likelihoods of the discrete pixel values: per image and per sub-pixel.
    likelihoods={"nll": "nats", "bits_per_dim": "bits/dim"},
    class_conditional=True,  # when trained with job.config.class_conditional: true (else labels are refused)
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16"),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Gated PixelCNN (masked vertical/horizontal stacks, R->G->B order; 256-way softmax, "
                "PixelCNN++ logistic mixture or Bernoulli head; class conditioning; exact NLL in "
                "nats and bits/dim; ancestral sampling, inpainting)",
)
