"""The plain Ray Train V2 script `gentrain bench e2e` measures `gentrain run` against.

    python platform/gentrain/bench/baseline_ray_train.py --steps 300 --workers 2 --batch-size 32
    python platform/gentrain/bench/baseline_ray_train.py --model cifar10-vae --data cifar10-synthetic.npz \
        --steps 60 --batch-size 50 --lr 1e-3 --log-every 5

What a user would write by hand: the data held in memory as one tensor, a shuffled
disjoint share per rank each epoch, DistributedDataParallel (gloo), AdamW and gradient
clipping at 1.0; nothing else (no schedule, evaluation, checkpoints or tracking). Ray
starts as a plain script starts it (`ray.init(address="local")`, Ray's defaults). The
network is the VAE job type's ConvVAE, built through the registry exactly as gentrain
builds it, so both sides train the same weights:

- debug-vae (vae/debug): scikit-learn's 8x8 digits (scaled to [0, 1] as gentrain packs
  them), latent 8, channels [32, 64]; the loss written here by hand: the negative
  Bernoulli ELBO, beta 1.
- cifar10-vae (vae/cifar10's network): the x_train images of an .npz (--data; the bench's
  synthetic set), uint8 divided by 255 as gentrain's pipeline scales them; latent 128,
  channels [128, 256, 512, 1024], discretized-logistic likelihood. The ELBO and the
  per-pixel discretized-logistic log-probability are written here by hand, PixelCNN++'s
  way, the same mathematics as the job type's (gentrain_jobs/vae/likelihoods.py), which
  the platform never imports.

With GENTRAIN_TIMELINE set it appends the same marks a gentrain run does
(gentrain.timeline's format): the bench reads the time to the first step and the
steady rate from them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _mark(event: str, **fields) -> None:
    path = os.environ.get("GENTRAIN_TIMELINE")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"event": event, "time": time.time(), "cpu": time.process_time(),
                                  "pid": os.getpid(), **fields}) + "\n")


# The VAE job type's config of each model (what vae/debug.yaml and vae/cifar10.yaml set).
NETWORKS = {
    "debug-vae": ({"latent_dim": 8, "channels": [32, 64], "likelihood": "bernoulli"}, (1, 8, 8)),
    "cifar10-vae": ({"latent_dim": 128, "channels": [128, 256, 512, 1024], "likelihood": "logistic"}, (3, 32, 32)),
}


def load_images(model: str, samples: int | None = None, data: str | None = None):
    """The training images as one float tensor [N, C, H, W] in [0, 1]."""
    import numpy as np
    import torch

    if model == "debug-vae":
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().images[:samples], dtype=torch.float32)
        return (images * (255.0 / 16.0)).round().div(255.0).unsqueeze(1)  # [N, 1, 8, 8]
    if data is None:
        raise SystemExit(f"--model {model} needs --data: an .npz holding x_train, uint8 [N, H, W, C]")
    with np.load(data) as archive:
        pixels = archive["x_train"]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div(255.0)


def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) per pixel for x on the 8-bit grid {0, 1/255, ..., 1}, PixelCNN++'s way: the
    logistic's mass over the pixel's bin, the edge bins open to infinity, the density at
    the centre where a bin's mass is too small to take its log."""
    import math

    import torch
    import torch.nn.functional as F

    half = 0.5 / 255.0
    x = torch.round(x * 255.0) / 255.0
    centred, inv_scale = x - mean, torch.exp(-log_scale)
    upper, lower = inv_scale * (centred + half), inv_scale * (centred - half)
    log_cdf_upper = upper - F.softplus(upper)
    log_survival_lower = -F.softplus(lower)
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    middle = inv_scale * centred
    log_density = middle - log_scale - 2.0 * F.softplus(middle)
    interior = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_density + math.log(2 * half))
    return torch.where(x < half, log_cdf_upper, torch.where(x > 1.0 - half, log_survival_lower, interior))


def negative_elbo(output, x, likelihood: str):
    """The batch mean of -(log p(x|z) - KL(q(z|x) || N(0, I))), beta 1."""
    import torch.nn.functional as F

    decoded, mean, log_var, log_scale = output
    if likelihood == "bernoulli":
        reconstruction = -F.binary_cross_entropy_with_logits(decoded, x, reduction="none").flatten(1).sum(1)
    else:
        reconstruction = discretized_logistic_log_prob(x, decoded, log_scale).flatten(1).sum(1)
    kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
    return (kl - reconstruction).mean()


def train_loop(config: dict) -> None:
    import ray.train
    import torch

    from gentrain.registry import DataInfo, get_job_type

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        _mark("worker_start")
    images = load_images(config["model"], config["samples"], config["data"])
    if rank == 0:
        _mark("dataset_open")
    job = get_job_type("vae")
    network, shape = NETWORKS[config["model"]]
    vae_config = job.parse_config(network, [])
    torch.manual_seed(config["seed"])
    model = job.build(vae_config, DataInfo(shape))["vae"]
    if rank == 0:
        _mark("model_built")
    model = ray.train.torch.prepare_model(model)  # DistributedDataParallel
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    if rank == 0:
        _mark("strategy_ready")
    batch, steps, log_every = config["batch_size"], config["steps"], config["log_every"]
    per_epoch = len(images) // (batch * world)

    def batches():
        epoch = 0
        while True:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
            mine = order[rank::world]
            for i in range(per_epoch):
                yield images[mine[i * batch:(i + 1) * batch]]
            epoch += 1

    stream = batches()
    for step in range(1, steps + 1):
        x = next(stream)
        loss = negative_elbo(model(x), x, vae_config.likelihood)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if rank == 0 and step == 1:
            _mark("first_step", step=step)
        if rank == 0 and (step % log_every == 0 or step == steps):
            _mark("step", step=step)
            print(f"step {step}/{steps} | loss {loss.item():.4f}", flush=True)
    ray.train.report({"step": steps, "loss": float(loss)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(NETWORKS), default="debug-vae")
    parser.add_argument("--data", default=None, help="cifar10-vae: an .npz with x_train, uint8 [N, H, W, C]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1797,
                        help="debug-vae: digits held in memory (the train split's size)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=None, help="Ray Train's storage_path (default: a temporary folder)")
    args = parser.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _mark("cli_start")  # as gentrain's: after the driver's imports
    ray.init(address="local", logging_level="WARNING")
    _mark("ray_started")
    storage = args.storage or tempfile.mkdtemp(prefix="baseline-ray-train-")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"model": args.model, "data": args.data and os.path.abspath(args.data),
                           "steps": args.steps, "batch_size": args.batch_size, "samples": args.samples,
                           "lr": args.lr, "log_every": args.log_every, "seed": args.seed},
        scaling_config=ScalingConfig(num_workers=args.workers),
        run_config=RunConfig(name="baseline", storage_path=os.path.abspath(storage)),
    )
    _mark("trainer_built")
    trainer.fit()
    _mark("trainer_done")


if __name__ == "__main__":
    main()
