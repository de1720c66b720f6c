"""What the strategies refuse to run, written once: `gentrain validate` reports it from the
spec, and the strategies refuse it again at start-up (a spec built without validation, a
test) with the same words.

Both are combinations a library would silently run as something else:
- fp16 on CPUs: DDP and Accelerate run plain fp32, and DeepSpeed needs AVX512-FP16 units.
- Accelerate's FSDP: on a CPU Accelerate 1.15 never enters FSDP (it keeps DDP), and
  gentrain's GPU FSDP path (sharded EMA, gathering for samples, sharded checkpoints) is
  not built yet.
And one policy DeepSpeed's engine leaves no room for: train.nonfinite=skip.
"""

from __future__ import annotations


def fp16_problem(precision: str, on_gpu: bool) -> str | None:
    if precision != "fp16" or on_gpu:
        return None
    return ("strategy.precision: 'fp16' needs GPU workers (on CPUs, DDP and Accelerate silently "
            "run fp32 and DeepSpeed needs AVX512-FP16 units); use strategy.precision=bf16 on CPU, "
            "or set scaling.use_gpu=true")


def fsdp_problem(accelerate_mode: str, on_gpu: bool) -> str | None:
    if accelerate_mode != "fsdp":
        return None
    where = ("gentrain's FSDP path (sharded EMA, gathering for samples, sharded checkpoints) is "
             "not built" if on_gpu else "on a CPU Accelerate 1.15 never enters FSDP: it quietly keeps DDP")
    return (f"strategy.accelerate_mode: 'fsdp' is not supported yet ({where}); use "
            "strategy.accelerate_mode=ddp, or strategy.name=deepspeed with strategy.zero_stage=3 "
            "to shard parameters")


def nonfinite_problem(strategy_name: str, policy: str) -> str | None:
    """train.nonfinite=skip under DeepSpeed would have to undo what its engine has already
    reduced into partitions (its own skipping is fp16 loss scaling): not built yet."""
    if strategy_name == "deepspeed" and policy == "skip":
        return ("train.nonfinite: 'skip' is not supported with strategy.name=deepspeed yet; use "
                "train.nonfinite=stop (the default), or strategy.name=ddp to skip non-finite steps")
    return None
