"""The `gentrain` command.

    gentrain run vae/debug train.steps=200 scaling.num_workers=1
    gentrain sweep vae/debug --param train.optimizer.lr=loguniform(1e-4,1e-2) --samples 8 --metric eval/elbo --mode max
    gentrain sync runs/vae-debug        # MLflow records left unsent by an outage, and the final status
    gentrain validate path/to/spec.yaml
    gentrain list
    gentrain data pack digits --out data/digits --per-shard 256
    gentrain sample runs/vae-debug --n 64 --out grid.png --set temperature=0.8
    gentrain score runs/vae-debug builtin:digits --out scores.csv
    gentrain eval runs/vae-debug --metrics fid,kid,is,pr,nll --extractor classifier:runs/classifier-debug
    gentrain bench data
    gentrain bench strategies
    gentrain bench memory
    gentrain bench likelihoods --budget 60s
    gentrain bench e2e --rounds 3
    gentrain bench e2e --model cifar10-vae
    gentrain submit vae/debug storage_path=/shared/runs --address http://HEAD:8265
    gentrain status JOB | gentrain logs JOB --follow | gentrain stop JOB | gentrain jobs
"""

from __future__ import annotations

import argparse
import sys
import time

from gentrain.registry import UnknownJobType
from gentrain.schema import SpecError


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a bundled spec (vae/debug) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override spec fields, e.g. train.steps=200 scaling.num_workers=1")


class _Parser(argparse.ArgumentParser):
    """Options and `key=value` overrides in any order (`submit vae/debug --address URL name=x`).

    argparse ends a `nargs="*"` positional at the first option, and
    parse_intermixed_args refuses subcommands: what is left over after the options is
    taken as overrides of the commands that have them (for `sample`, as more sampler
    settings: `--set sampler=ddim steps=50` is `--set sampler=ddim --set steps=50`),
    anything else is an error."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        for field in ("overrides", "sampling"):
            if hasattr(parsed, field):
                taken = [arg for arg in extras if "=" in arg and not arg.startswith("-")]
                setattr(parsed, field, list(getattr(parsed, field) or []) + taken)
                extras = [arg for arg in extras if arg not in taken]
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gentrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a spec on an embedded local Ray")
    _spec_args(run)
    run.set_defaults(handler=cmd_run)

    from gentrain.launch.sync_cli import add_sync_command

    add_sync_command(commands)  # sync: records an MLflow outage left unsent

    from gentrain.launch.remote_cli import add_cluster_commands

    add_cluster_commands(commands)  # submit, status, logs, stop, jobs

    from gentrain.sweep.cli import add_sweep_command

    add_sweep_command(commands)  # sweep: Ray Tune trials of a spec

    validate = commands.add_parser("validate", help="check a spec and report every problem")
    _spec_args(validate)
    validate.add_argument("--print", action="store_true", help="print the resolved spec")
    validate.set_defaults(handler=cmd_validate)

    listing = commands.add_parser("list", help="list job types and bundled specs")
    listing.set_defaults(handler=cmd_list)

    data = commands.add_parser("data", help="data set tools").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    pack = data.add_parser("pack", help="pack a data source into WebDataset shards")
    pack.add_argument("source", help="a built-in source (digits, mnist5k), an image folder, "
                      "a .npz/.npy file, MNIST IDX files, CIFAR python batches or a text file")
    pack.add_argument("--out", required=True, help="output folder (shards + index.json)")
    size = pack.add_mutually_exclusive_group()
    size.add_argument("--per-shard", type=int, default=None,
                      help="samples per shard (default 512 unless --shard-size is given)")
    size.add_argument("--shard-size", default=None, help="target shard size, e.g. 256MB")
    pack.add_argument("--test-fraction", type=float, default=0.1,
                      help="held-out fraction written as the 'test' split when the source has "
                      "no split of its own (default 0.1)")
    pack.add_argument("--image-size", type=int, default=None,
                      help="resize the shorter side and centre-crop images to this side")
    pack.add_argument("--seq-len", type=int, default=256,
                      help="text sources: tokens (bytes, or BPE tokens) per sample sequence (default 256)")
    bpe = pack.add_mutually_exclusive_group()
    bpe.add_argument("--bpe-vocab", type=int, default=None,
                     help="text sources: learn a byte-level BPE of this many tokens on the train split "
                     "(written to DIR/merges.txt); default: plain bytes (vocabulary 256)")
    bpe.add_argument("--bpe-merges", default=None,
                     help="text sources: encode with this merges.txt of an earlier --bpe-vocab pack (or a GPT-2 "
                     "merges.txt with its vocab.json beside it)")
    pack.add_argument("--workers", type=int, default=1, help="packing processes (default 1)")
    pack.add_argument("--seed", type=int, default=0)
    pack.set_defaults(handler=cmd_data_pack)

    sample = commands.add_parser("sample", help="draw samples from a trained run into a grid PNG (text: a .txt)")
    sample.add_argument("ref", metavar="RUN_OR_CHECKPOINT",
                        help="a checkpoint folder, a run folder (<storage_path>/<name>), an MLflow run id "
                        "or a model URI gentrain logged (models:/NAME/VERSION, runs:/RUN_ID/model)")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default="samples.png",
                        help="output PNG (default samples.png); token samples are written as text with the suffix .txt")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights, not EMA")
    sample.add_argument("--set", dest="sampling", action="append", default=[], metavar="KEY=VALUE",
                        help="a sampler setting of the job type over the spec's job.sampling, e.g. "
                             "--set temperature=0.8 (vae), --set sampler=ddim steps=50 (diffusion: more "
                             "KEY=VALUE may follow one --set); repeatable")
    sample.add_argument("--labels", type=_labels, default=None, metavar="K[,K...]",
                        help="class labels to condition on, cycled over the --n samples (e.g. 3, or 0,1,2); "
                             "default: the job type chooses")
    sample.set_defaults(handler=cmd_sample)

    score = commands.add_parser("score", help="per-sample anomaly scores of a data set (CSV)")
    score.add_argument("ref", metavar="RUN_OR_CHECKPOINT")
    score.add_argument("data", help="a packed data set: folder, URL or builtin:NAME")
    score.add_argument("--split", default="test", help="which split to score (default test)")
    score.add_argument("--out", default="scores.csv", help="output CSV (default scores.csv)")
    score.add_argument("--batch-size", type=int, default=256)
    score.set_defaults(handler=cmd_score)

    _eval_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    bench_data = bench_kinds.add_parser(
        "data", help="data pipeline samples/s against plain tarfile + numpy reading")
    bench_data.add_argument("--samples", type=int, default=20000,
                            help="samples per measured configuration (default 20000)")
    bench_data.add_argument("--json", default="bench-data.json", help="where to write results")
    bench_data.set_defaults(handler=cmd_bench_data)
    bench_strategies = bench_kinds.add_parser(
        "strategies", help="training samples/s of every strategy and precision vs plain PyTorch")
    bench_strategies.add_argument("--device", choices=("cuda", "cpu"), default=None,
                                  help="default: cuda when torch sees a GPU, else cpu")
    bench_strategies.add_argument("--steps", type=int, default=None,
                                  help="timed steps per run (default 50 on a GPU, 10 on a CPU)")
    bench_strategies.add_argument("--json", default="bench-strategies.json", help="where to write results")
    bench_strategies.set_defaults(handler=cmd_bench_strategies)
    bench_memory = bench_kinds.add_parser(
        "memory", help="peak GPU memory of a large MLP under ddp, ZeRO 2/3 and CPU offload")
    bench_memory.add_argument("--width", type=int, default=8192, help="Linear layer width (default 8192)")
    bench_memory.add_argument("--layers", type=int, default=12, help="Linear layers (default 12: ~0.8B parameters)")
    bench_memory.add_argument("--json", default="bench-memory.json", help="where to write results")
    bench_memory.set_defaults(handler=cmd_bench_memory)
    bench_nll = bench_kinds.add_parser(
        "likelihoods", help="PixelCNN NLL vs VAE IWAE bound vs RealNVP NLL on binarized MNIST-5k, same wall time")
    bench_nll.add_argument("--budget", default="60s", help="train.max_time of every family (default 60s)")
    bench_nll.add_argument("--workers", type=int, default=1, choices=(1, 2), help="scaling.num_workers (default 1)")
    bench_nll.add_argument("--data", default=None,
                           help="a packed data set of binary images (default: builtin:mnist5k binarized, packed once)")
    bench_nll.add_argument("--storage", default=None,
                           help="a new folder for the runs (default runs/bench-likelihoods-<time>)")
    bench_nll.add_argument("--tracking-uri", default=None, help="MLflow (default: as `gentrain run`)")
    bench_nll.add_argument("--set", dest="settings", action="append", default=[], metavar="FAMILY:KEY=VALUE",
                           help="a spec override of one family (pixelcnn, vae, realnvp), e.g. "
                           "vae:job.config.iwae_samples=64; repeatable")
    bench_nll.add_argument("--eval-batches", type=int, default=None, help="cap on held-out batches (default: all)")
    bench_nll.add_argument("--json", default="bench-likelihoods.json", help="where to write results")
    bench_nll.set_defaults(handler=cmd_bench_likelihoods)
    bench_mfu = bench_kinds.add_parser(
        "mfu", help="counted model FLOPs per step over step time, as a share of this machine's matmul peak")
    bench_mfu.add_argument("--models", type=_names, default=None, metavar="NAME[,NAME...]",
                           help="which models (default: all of diffusion-debug, diffusion-cifar10, "
                           "transformer-debug, transformer-gpt2-small)")
    bench_mfu.add_argument("--seconds", type=float, default=3.0,
                           help="timed seconds per model, after the warm-up steps (default 3)")
    bench_mfu.add_argument("--warmup", type=int, default=5, help="untimed steps per model (default 5)")
    bench_mfu.add_argument("--threads", type=int, default=None,
                           help="torch threads (default: torch's, the usable CPUs unless OMP_NUM_THREADS is set)")
    bench_mfu.add_argument("--json", default="bench-mfu.json", help="where to write results")
    bench_mfu.set_defaults(handler=cmd_bench_mfu)
    bench_scaling = bench_kinds.add_parser(
        "scaling", help="1 vs 2 data-parallel workers (gloo, no Ray) with threads per worker set fairly")
    bench_scaling.add_argument("--model", default="diffusion-cifar10",
                               help="a model of `bench mfu` (default diffusion-cifar10: the DDPM CIFAR-10 UNet)")
    bench_scaling.add_argument("--batch-size", type=int, default=8, help="per worker (default 8)")
    bench_scaling.add_argument("--steps", type=int, default=4, help="timed steps per configuration (default 4)")
    bench_scaling.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench_scaling.add_argument("--rounds", type=int, default=1, help="alternating rounds (default 1)")
    bench_scaling.add_argument("--json", default="bench-scaling.json", help="where to write results")
    bench_scaling.set_defaults(handler=cmd_bench_scaling)
    bench_checkpoint = bench_kinds.add_parser(
        "checkpoint", help="checkpoint save and restore seconds against model size: ddp, ZeRO-2, ZeRO-3 (gloo); "
                           "with the seconds a save blocks the loop, synchronous and checkpoint.asynchronous")
    bench_checkpoint.add_argument("--sizes", type=_sizes, default=None, metavar="DxL[,DxL...]",
                                  help="transformer d_model x layers (default 256x2,512x4,768x4)")
    bench_checkpoint.add_argument("--strategies", type=_names, default=None, metavar="NAME[,NAME...]",
                                  help="default: ddp,deepspeed-zero2,deepspeed-zero3")
    bench_checkpoint.add_argument("--world-size", type=int, default=2, help="gloo ranks (default 2)")
    bench_checkpoint.add_argument("--folder", default=None,
                                  help="where the checkpoints are written (default: the system's temporary folder)")
    bench_checkpoint.add_argument("--json", default="bench-checkpoint.json", help="where to write results")
    bench_checkpoint.set_defaults(handler=cmd_bench_checkpoint)
    bench_features = bench_kinds.add_parser(
        "features", help="evaluation feature extraction images/s (FID Inception) against the network by hand")
    bench_features.add_argument("--images", type=int, default=200, help="images per run (default 200)")
    bench_features.add_argument("--batch-size", type=int, default=50, help="images per forward (default 50)")
    bench_features.add_argument("--size", type=int, default=32, help="image side before the 299 resize (default 32)")
    bench_features.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    bench_features.add_argument("--json", default="bench-features.json", help="where to write results")
    bench_features.set_defaults(handler=cmd_bench_features)
    bench_e2e = bench_kinds.add_parser(
        "e2e", help="`gentrain run` vs a plain Ray Train script: steps/s, wall time, time to first step")
    bench_e2e.add_argument("--model", choices=("debug-vae", "cifar10-vae"), default="debug-vae",
                           help="debug-vae: vae/debug on the digits (default); cifar10-vae: vae/cifar10's "
                                "19M-parameter VAE on CPU, on a synthetic CIFAR-sized set")
    bench_e2e.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    bench_e2e.add_argument("--steps", type=int, default=None,
                           help="train.steps of every run (default: debug-vae 300, cifar10-vae 60)")
    bench_e2e.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    bench_e2e.add_argument("--batch-size", type=int, default=None,
                           help="per worker (default: debug-vae 32, cifar10-vae 50)")
    bench_e2e.add_argument("--keep", default=None, help="a folder for the runs and their logs (default: a temporary one)")
    bench_e2e.add_argument("--json", default="bench-e2e.json", help="where to write results")
    bench_e2e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="a spec override for both gentrain runs, after the bench's own (repeatable; "
                                "e.g. tracking.enabled=false); the plain script is unchanged")
    bench_e2e.set_defaults(handler=cmd_bench_e2e)
    return parser


def cmd_validate(args) -> int:
    from gentrain.spec import dump_yaml
    from gentrain.validation import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.print:
        print(dump_yaml(spec), end="")
    print(f"{args.spec}: ok ({spec.job.type}, {spec.strategy.name}/{spec.strategy.precision}, "
          f"{spec.scaling.num_workers} workers, {spec.train.steps} steps)")
    return 0


def cmd_list(args) -> int:
    from gentrain.registry import job_types
    from gentrain.validation import bundled_specs

    print("job types:")
    for name, job_type in sorted(job_types().items()):
        strategies = ",".join(job_type.supports.strategies)
        print(f"  {name:<14} {job_type.description} [strategies: {strategies}]")
    print("bundled specs:")
    for name in bundled_specs():
        print(f"  {name}")
    return 0


def cmd_run(args) -> int:
    from gentrain.timeline import mark

    mark("cli_start")
    from gentrain.launch.local import run
    from gentrain.nonfinite import NonFiniteError, where_a_rerun_continues
    from gentrain.validation import load_job

    job = load_job(args.spec, args.overrides)
    mark("job_validated")
    spec = job.spec
    from gentrain.launch.console import route_worker_logs

    route_worker_logs()  # the driver sends rank 0's MLflow records: its warnings marked as the workers' are
    try:
        summary = run(job)
    except NonFiniteError as exc:  # deterministic: reported as it is, without Ray's log lines
        print(f"error: training {spec.name} stopped: {exc}\n{where_a_rerun_continues(spec.run_dir)}",
              file=sys.stderr)
        return 1
    except Exception as exc:
        from ray.train import TrainingFailedError

        from gentrain.launch.storage import storage_failure

        from gentrain.launch.failures import data_failure, death_failure

        short = (storage_failure(exc, spec.storage_path, spec.run_dir)
                 or death_failure(exc, spec.checkpoint.max_failures, spec.run_dir)
                 or data_failure(exc, spec.checkpoint.max_failures, spec.run_dir))
        if short:  # full storage, a killed worker, a bad shard: what to do, not the workers' tracebacks
            _report_ray_failure(lines=0)
            print(f"error: training {spec.name} failed: {short}", file=sys.stderr)
            return 1
        # A TrainingFailedError carries the workers' tracebacks: Ray's lines would repeat them.
        _report_ray_failure(lines=0 if isinstance(exc, TrainingFailedError) else 30)
        if not isinstance(exc, TrainingFailedError):
            raise
        retried = (f" (Ray Train restarted the workers {spec.checkpoint.max_failures} times: "
                   "checkpoint.max_failures)" if spec.checkpoint.max_failures > 0 else "")
        print(f"error: training {spec.name} failed{retried}: {exc}\n"
              f"Checkpoints written before the failure are kept in {spec.run_dir}; "
              "fix the cause and run the same command to continue from the latest.",
              file=sys.stderr)
        return 1
    if summary.trained:
        print()
        print(f"[gentrain] done: {spec.name}")
        if summary.metrics.get("stopped_at_time_budget"):
            print(f"  stopped at the time budget ({spec.train.max_time}) after "
                  f"{summary.metrics.get('step')} steps (train.steps={spec.train.steps})")
    print(f"  checkpoints : {summary.checkpoint or 'none'}")
    print(f"  samples     : {summary.samples or 'none'}")
    if summary.mlflow_run_id:
        print(f"  mlflow run  : {summary.mlflow_run_id}")
        print(f"  view it     : {summary.mlflow_pointer}")
    if summary.tracking_end is not None and not summary.tracking_end.marked:
        from gentrain.launch.local import unsent_message

        print(unsent_message(summary.tracking_end, spec.run_dir))
    return 0


def _report_ray_failure(lines: int) -> None:
    """Ray's last lines, kept back while the run went well, and where its logs are."""
    from gentrain.launch import console
    from gentrain.launch.local import ray_log_dir

    if console.current() is not None:
        console.current().report_failure(ray_log_dir(), lines)


def cmd_data_pack(args) -> int:
    from gentrain.data.pack import pack_source

    index = pack_source(args.source, args.out, per_shard=args.per_shard,
                        shard_size=args.shard_size, test_fraction=args.test_fraction,
                        seed=args.seed, workers=args.workers, image_size=args.image_size,
                        seq_len=args.seq_len, bpe_vocab=args.bpe_vocab, bpe_merges=args.bpe_merges)
    splits = ", ".join(f"{name}: {info['total']} samples in {len(info['shards'])} shards"
                       for name, info in index["splits"].items())
    print(f"[gentrain] packed {args.source} into {args.out} ({splits})")
    return 0


def cmd_sample(args) -> int:
    from gentrain.inference import load_trained
    from gentrain.visual import save_samples

    trained = load_trained(args.ref, use_ema=not args.no_ema, sampling=args.sampling)
    started = time.perf_counter()
    images = trained.sample(args.n, args.seed, _sample_labels(trained, args.labels, args.n))
    rate = args.n / max(time.perf_counter() - started, 1e-9)
    path = save_samples(images, args.out, trained.data_info)
    print(f"[gentrain] {args.n} samples of {trained.spec.name} (step {trained.step}, "
          f"{trained.checkpoint}) -> {path} ({rate:,.1f} samples/s)")
    _log_to_run(trained, path, "samples/cli")
    return 0


def _sample_labels(trained, labels: list[int] | None, n: int):
    """--labels cycled over the n samples, for a family that samples by class."""
    if labels is None:
        return None
    import torch

    if not trained.job.class_conditional:
        raise ValueError(f"--labels: job type {trained.job.name!r} does not sample by class "
                         "(it declares class_conditional=False); leave --labels out")
    classes = trained.data_info.num_classes
    if max(labels) >= classes:
        raise ValueError(f"--labels: {labels} outside the {classes} classes of the data "
                         f"{trained.spec.name} trained on (0 .. {classes - 1})")
    return torch.tensor(labels, dtype=torch.int64).repeat(-(-n // len(labels)))[:n]


def _labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class numbers, e.g. 0,1,2") from None
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give class numbers >= 0, e.g. 3 or 0,1,2")
    return labels


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more comma-separated names")
    return names


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(n) for n in part.lower().split("x")) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give d_model x layers pairs, e.g. 256x2,512x4")
    return sizes


def cmd_score(args) -> int:
    from gentrain.inference import load_trained
    from gentrain.scoring import score_dataset

    trained = load_trained(args.ref)
    rows, columns = score_dataset(trained, args.data, args.split, args.out, args.batch_size)
    print(f"[gentrain] scored {rows} samples of {args.data} ({args.split}) with {trained.spec.name} "
          f"(step {trained.step}): {', '.join(columns)} -> {args.out}")
    return 0


def _log_to_run(trained, path, artifact_path: str) -> None:
    """Attach a CLI output to the run's MLflow run; never fails the command."""
    if not trained.mlflow_run_id or not trained.spec.tracking.enabled:
        return
    try:
        import mlflow

        from gentrain.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(trained.spec.tracking.uri)
        mlflow.MlflowClient(uri).log_artifact(trained.mlflow_run_id, str(path), artifact_path)
        print(f"[gentrain] logged to MLflow run {trained.mlflow_run_id} ({artifact_path}/)")
    except Exception as exc:  # noqa: BLE001 - the output file exists either way
        print(f"warning: could not log {path} to MLflow run {trained.mlflow_run_id}: {exc}",
              file=sys.stderr)


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="FID, KID, IS, precision/recall and likelihoods of a trained run, logged to its MLflow run")
    evaluate.add_argument("ref", metavar="RUN_OR_CHECKPOINT",
                          help="a checkpoint folder, a run folder (<storage_path>/<name>), an MLflow run id "
                        "or a model URI gentrain logged (models:/NAME/VERSION, runs:/RUN_ID/model)")
    evaluate.add_argument("--metrics", default="fid,kid,is,pr,nll",
                          help="comma-separated: fid, kid, is, pr (from samples), nll (the job type's likelihoods), "
                          "heldout (everything its evaluate returns); default fid,kid,is,pr,nll")
    evaluate.add_argument("--n", type=int, default=10_000,
                          help="generated samples, and at most as many reference images (default 10000; "
                          "50000 is the published standard)")
    evaluate.add_argument("--data", default=None, help="reference data set (default: the run's data.source)")
    evaluate.add_argument("--split", default=None, help="reference split (default: the run's train split)")
    evaluate.add_argument("--eval-split", default=None,
                          help="split for nll/heldout (default: the run's data.eval_split)")
    evaluate.add_argument("--extractor", default="inception",
                          help="inception (default) or classifier:REF, a classifier run/checkpoint/MLflow id")
    evaluate.add_argument("--inception-weights", default=None,
                          help="pt_inception-2015-12-05-6726825d.pth (default: $GENTRAIN_INCEPTION_WEIGHTS)")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="Ray tasks that sample and extract features (embedded local Ray; default 1: in process)")
    evaluate.add_argument("--batch-size", type=int, default=250, help="samples per unit of work (default 250)")
    evaluate.add_argument("--max-batches", type=int, default=None, help="cap on nll/heldout batches")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-ema", action="store_true", help="use the raw weights, not EMA")
    evaluate.add_argument("--is-splits", type=int, default=10,
                          help="Inception Score splits, at most --n (default 10)")
    evaluate.add_argument("--kid-subsets", type=int, default=100, help="KID subsets, at least 2 (default 100)")
    evaluate.add_argument("--kid-subset-size", type=int, default=None,
                          help="samples per KID subset, below the number of samples (default min(1000, n // 2))")
    evaluate.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                          help="change an evaluation setting of the run's job.config (e.g. diffusion's "
                          "ode_likelihood_steps=100); settings that shape the network are refused")
    evaluate.add_argument("--out", default=None, help="also write the JSON report here")
    evaluate.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    import json

    from gentrain.evaluation.run import EvalRequest, evaluate_checkpoint, parse_metrics
    from gentrain.metrics.settings import CLI_NAMES, MetricSettings

    if args.n < 2 or args.workers < 1 or args.batch_size < 1:
        raise ValueError(f"--n ({args.n}) must be >= 2, --workers ({args.workers}) and --batch-size "
                         f"({args.batch_size}) >= 1")
    metrics = parse_metrics(args.metrics)
    settings = MetricSettings(args.is_splits, args.kid_subsets, args.kid_subset_size)
    problems = settings.problems(metrics, args.n, CLI_NAMES)
    if problems:
        raise ValueError("; ".join(problems))
    request = EvalRequest(args.ref, metrics, n=args.n, data=args.data, split=args.split,
                          eval_split=args.eval_split, extractor=args.extractor,
                          inception_weights=args.inception_weights, workers=args.workers,
                          batch_size=args.batch_size, seed=args.seed, max_batches=args.max_batches,
                          use_ema=not args.no_ema, out=args.out, settings=settings,
                          config_changes=list(args.config))
    report = evaluate_checkpoint(request)
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_bench_strategies(args) -> int:
    from gentrain.bench.strategies import run_strategy_bench

    run_strategy_bench(device=args.device, steps=args.steps, json_path=args.json)
    return 0


def cmd_bench_memory(args) -> int:
    from gentrain.bench.memory import run_memory_bench

    run_memory_bench(width=args.width, layers=args.layers, json_path=args.json)
    return 0


def cmd_bench_e2e(args) -> int:
    from gentrain.bench.e2e import run_e2e_bench

    run_e2e_bench(rounds=args.rounds, steps=args.steps, workers=args.workers, batch_size=args.batch_size,
                  json_path=args.json, keep=args.keep, model=args.model, overrides=tuple(args.overrides))
    return 0


def cmd_bench_mfu(args) -> int:
    from gentrain.bench.mfu import DEFAULT_MODELS, run_mfu_bench

    run_mfu_bench(models=args.models or DEFAULT_MODELS, seconds=args.seconds, warmup=args.warmup,
                  threads=args.threads, json_path=args.json)
    return 0


def cmd_bench_scaling(args) -> int:
    from gentrain.bench.scaling import run_scaling_bench

    run_scaling_bench(model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                      rounds=args.rounds, json_path=args.json)
    return 0


def cmd_bench_features(args) -> int:
    from gentrain.bench.features import run_features_bench

    run_features_bench(images=args.images, batch_size=args.batch_size, size=args.size, rounds=args.rounds,
                       json_path=args.json)
    return 0


def cmd_bench_checkpoint(args) -> int:
    from gentrain.bench.checkpoint import DEFAULT_SIZES, STRATEGIES, run_checkpoint_bench

    run_checkpoint_bench(sizes=args.sizes or DEFAULT_SIZES, strategies=args.strategies or tuple(STRATEGIES),
                         world_size=args.world_size, folder=args.folder, json_path=args.json)
    return 0


def cmd_bench_likelihoods(args) -> int:
    from gentrain.bench.likelihoods import run_likelihood_bench

    run_likelihood_bench(budget=args.budget, workers=args.workers, data=args.data, storage=args.storage,
                         tracking_uri=args.tracking_uri, overrides=args.settings,
                         eval_batches=args.eval_batches, json_path=args.json)
    return 0


def cmd_bench_data(args) -> int:
    from gentrain.bench.data import run_data_bench

    run_data_bench(samples=args.samples, json_path=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, UnknownJobType) as exc:
        # UnknownJobType: e.g. sampling a run whose family's package is not installed here
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the latest checkpoint is kept and `gentrain run` continues from it",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
