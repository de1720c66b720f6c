"""What the strategies refuse to run, written once: `gentrain validate` reports it from the
spec, and the strategies (the engine, for the last) refuse it again at start-up (a spec
built without validation, a test) with the same words.

Two are combinations a library would silently run as something else:
- fp16 on CPUs: DDP and Accelerate run plain fp32, and DeepSpeed needs AVX512-FP16 units.
- Accelerate's FSDP: on a CPU Accelerate 1.15 never enters FSDP (it keeps DDP), and
  gentrain's GPU FSDP path (sharded EMA, gathering for samples, sharded checkpoints) is
  not built yet.
And a policy that needs the run folder on this machine's file system:
train.nonfinite=rollback finds the newest good checkpoint there.
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
            "strategy.accelerate_mode=ddp, or strategy.name=fsdp (torch's FSDP2) or strategy.name=deepspeed "
            "with strategy.zero_stage=3 to shard parameters")


def nonfinite_problem(policy: str, run_dir: str) -> str | None:
    """train.nonfinite=rollback lists the run folder for the newest good checkpoint
    (gentrain.checkpoint); with s3:// or gs:// storage Ray Train's snapshot holds that list."""
    from gentrain.paths import is_remote

    if policy == "rollback" and is_remote(run_dir):
        return (f"train.nonfinite: 'rollback' needs a local or shared storage_path (the run folder "
                f"{run_dir} is where it finds the newest good checkpoint); use train.nonfinite=stop "
                "or skip with remote storage, or a mounted storage_path")
    return None
