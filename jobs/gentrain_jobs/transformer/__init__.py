"""Autoregressive transformer job type: a decoder-only language model over token shards
(bytes of UTF-8 text as `gentrain data pack corpus.txt` writes them, or byte-level BPE
tokens with `--bpe-vocab V`).

    gentrain run transformer/debug                      # the bundled text, about a minute on 2 CPU workers
    gentrain data pack corpus.txt --out data/corpus --seq-len 1024
    gentrain run transformer/gpt2-small data.source=data/corpus
    gentrain data pack corpus.txt --out data/corpus-bpe --seq-len 1024 --bpe-vocab 32768
    gentrain sample runs/transformer-debug --n 4 --set 'prompt="Tale 7: Ada"' --set top_p=0.9 --out tales.txt
    gentrain eval runs/transformer-debug --metrics nll  # nll (nats/token), bits_per_byte, perplexity

Files: model.py (the network, KV cache), sampling.py (temperature, top-k, top-p, cached
and uncached decoding), likelihood.py (held-out NLL, bits per byte, perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain_jobs.transformer.likelihood import (
    BYTE_VOCAB, bits_per_byte, bpe_bits_per_byte, perplexity, predicted_bytes, token_nll,
)
from gentrain_jobs.transformer.model import DecoderLM
from gentrain_jobs.transformer.sampling import generate


@dataclass
class TransformerConfig:
    layers: int = field(default=4, metadata=bounds(ge=1, help="transformer blocks"))
    d_model: int = field(default=128, metadata=bounds(ge=1, help="width of the residual stream"))
    heads: int = field(default=4, metadata=bounds(ge=1, help="attention heads; must divide d_model"))
    mlp_ratio: int = field(default=4, metadata=bounds(ge=1, help="MLP hidden width / d_model"))
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1,
                                                        help="on embeddings, attention and residual branches"))
    positions: Literal["learned", "rotary"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_weights: bool = True
    context: int = field(default=0, metadata=bounds(
        ge=0, help="longest sequence the model sees (learned positions); 0: the data's sample length"))

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"heads {self.heads} does not divide d_model {self.d_model}: pick heads "
                             f"among the divisors of d_model (e.g. d_model 768, heads 12)")
        if self.positions == "rotary" and (self.d_model // self.heads) % 2:
            raise ValueError(f"rotary positions rotate pairs of dimensions, but a head has "
                             f"{self.d_model // self.heads} (d_model / heads): make it even or use positions: learned")


@dataclass(frozen=True)
class TransformerSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    temperature: float = field(default=1.0, metadata=bounds(ge=0, help="divides the logits; 0 is greedy"))
    top_k: int = field(default=0, metadata=bounds(ge=0, help="keep the k most likely tokens; 0 keeps all"))
    top_p: float = field(default=1.0, metadata=bounds(gt=0, le=1, help="nucleus: keep the most likely tokens "
                                                                          "up to this probability mass; 1 keeps all"))
    length: int = field(default=0, metadata=bounds(ge=0, help="tokens to draw after the prompt; 0 fills the context"))
    prompt: str = field(default="\n", metadata=bounds(help="text the samples continue (UTF-8 bytes as tokens, "
                                                             "or BPE tokens of a BPE pack)"))
    cache: bool = True  # decode with the key/value cache (same tokens, far fewer FLOPs)


def build(config: TransformerConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    sample_length = int(data.shape[0])
    context = config.context or sample_length
    if config.positions == "learned" and context < sample_length:
        raise ValueError(f"job.config.context {context} is shorter than the data's samples ({sample_length} "
                         "tokens) and learned positions stop at the context: set context 0 (the data's "
                         "length) or repack the text with a smaller --seq-len")
    model = DecoderLM(data.vocab_size, context, config.layers, config.d_model, config.heads, config.mlp_ratio,
                      config.dropout, config.positions, config.norm, config.tie_weights)
    model.bpe_merges = tuple(data.merges)  # BPE packs: prompts are encoded with the pack's merges
    return {"transformer": model}


def train_step(ctx, batch) -> dict[str, float]:
    tokens = batch["tokens"]
    with ctx.autocast():
        logits = ctx.module("transformer")(tokens)
    nll = token_nll(logits, tokens)
    loss = nll.mean()
    ctx.backward(loss, "transformer")
    metrics = {"loss": float(loss.detach())}
    if "bytes" in batch:
        metrics["bits_per_byte"] = bpe_bits_per_byte(nll.detach(), batch)
    elif ctx.plain("transformer").vocab_size == BYTE_VOCAB:
        metrics["bits_per_byte"] = bits_per_byte(metrics["loss"])
    metrics.update(ctx.step("transformer"))
    return metrics


@torch.no_grad()
def evaluate(modules, config: TransformerConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Mean NLL per predicted token in nats (and bits per byte for byte tokens); the
    perplexity comes from the mean over all batches (summarize).

    BPE batches (with "bytes") give, per sample, the NLL in bits summed over its predicted
    tokens and the bytes those tokens stand for (bpe/bits_per_sample, bpe/bytes_per_sample);
    the platform averages both over the held-out set (weighted by samples), so their ratio in
    summarize is sum(bits) / sum(bytes) exactly (likelihood.py states the rule)."""
    model = modules["transformer"]
    tokens = batch["tokens"]
    nll_tokens = token_nll(model(tokens), tokens)
    nll = float(nll_tokens.mean())
    metrics = {"nll": nll}
    if "bytes" in batch:
        samples = tokens.shape[0]
        metrics["bpe/bits_per_sample"] = float(nll_tokens.double().sum()) / math.log(2) / samples
        metrics["bpe/bytes_per_sample"] = float(predicted_bytes(batch).double().sum()) / samples
    elif model.vocab_size == BYTE_VOCAB:
        metrics["bits_per_byte"] = bits_per_byte(nll)
    return metrics


def summarize(means: dict[str, float]) -> dict[str, float]:
    """perplexity = exp(mean nll); BPE: bits_per_byte = mean bits / mean bytes per sample."""
    summary = {"perplexity": perplexity(means["nll"])} if "nll" in means else {}
    if means.get("bpe/bytes_per_sample"):
        summary["bits_per_byte"] = means["bpe/bits_per_sample"] / means["bpe/bytes_per_sample"]
    return summary


def validate(config: TransformerConfig, spec) -> list[str]:
    """Rules across the config and the rest of the spec."""
    problems = []
    if spec.eval.metrics:
        problems.append(f"eval.metrics: {spec.eval.metrics} are image sample metrics (FID, KID, IS, PR) and a "
                        "text model draws token sequences; remove eval.metrics (held-out nll, bits_per_byte "
                        "and perplexity are logged at every evaluation)")
    return problems


def prompt_tokens(settings: TransformerSampler, vocab_size: int, merges=()) -> list[int]:
    """The prompt as byte tokens (byte vocabularies) or BPE tokens (with the pack's merges);
    other vocabularies start from token 0."""
    if merges and settings.prompt:
        from gentrain.data.bpe import Bpe

        bpe = Bpe(list(merges))
        if bpe.vocab_size == vocab_size:
            return bpe.encode(settings.prompt)
    if vocab_size == BYTE_VOCAB and settings.prompt:
        return list(settings.prompt.encode("utf-8"))
    return [0]


@torch.no_grad()
def sample(modules, config: TransformerConfig, request: SampleRequest) -> torch.Tensor:
    """int64 tokens [n, prompt + length]: the prompt, then the drawn continuation."""
    model = modules["transformer"]
    settings = request.settings
    prompt = prompt_tokens(settings, model.vocab_size, getattr(model, "bpe_merges", ()))
    room = model.context - len(prompt)
    if room < 1:
        raise ValueError(f"job.sampling.prompt is {len(prompt)} tokens, which fills the context "
                         f"{model.context}: shorten it")
    length = settings.length or room
    if length > room and model.position_embed is not None:
        raise ValueError(f"job.sampling.length {length} after a {len(prompt)}-token prompt passes the "
                         f"learned positions' context {model.context}: use length <= {room} (or 0)")
    start = torch.tensor(prompt, dtype=torch.int64).expand(request.n, -1)
    was_training = model.training
    model.eval()
    try:
        tokens = generate(model, start, length, request.generator, settings.temperature, settings.top_k,
                          settings.top_p, use_cache=settings.cache)
    finally:
        model.train(was_training)
    return tokens.cpu()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


JOB = JobType(
    name="transformer",
    config=TransformerConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    summarize=summarize,
    validate=validate,
    sampler=TransformerSampler,
    # per predicted token: nll in nats, perplexity exp(nll); bits per byte of the text (byte
    # tokens: nll / ln 2; BPE: sum of bits / sum of the predicted tokens' bytes)
    likelihoods={"nll": "nats", "bits_per_byte": "bits/byte", "perplexity": "perplexity"},
    data_kinds=("tokens",),
    # fp16 (loss scaling on a GPU) is left out until a GPU run of this family checks it:
    # tests/gpu trains only the VAE, and the strategy matrix skips fp16 on CPU.
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16"),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Decoder-only transformer language model (pre-norm, causal SDPA, learned or rotary "
                "positions, tied embeddings, KV-cache sampling with temperature/top-k/top-p; "
                "held-out NLL, bits per byte, perplexity)",
)

__all__ = ["JOB", "TransformerConfig", "TransformerSampler", "build", "count_parameters", "evaluate", "sample",
           "summarize", "train_step", "validate"]
