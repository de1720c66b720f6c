"""The `gentrain` command.

    gentrain run vae/debug train.steps=200 scaling.num_workers=1
    gentrain validate path/to/spec.yaml
    gentrain list
    gentrain data pack digits --out data/digits --per-shard 256
"""

from __future__ import annotations

import argparse
import sys

from gentrain.schema import SpecError


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a bundled spec (vae/debug) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override spec fields, e.g. train.steps=200 scaling.num_workers=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gentrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a spec on an embedded local Ray")
    _spec_args(run)
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a spec and report every problem")
    _spec_args(validate)
    validate.add_argument("--print", action="store_true", help="print the resolved spec")
    validate.set_defaults(handler=cmd_validate)

    listing = commands.add_parser("list", help="list job types and bundled specs")
    listing.set_defaults(handler=cmd_list)

    data = commands.add_parser("data", help="data set tools").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    pack = data.add_parser("pack", help="pack a data source into WebDataset shards")
    pack.add_argument("source", help="a built-in source: digits, mnist5k")
    pack.add_argument("--out", required=True, help="output folder (shards + index.json)")
    pack.add_argument("--per-shard", type=int, default=512, help="samples per shard (default 512)")
    pack.add_argument("--test-fraction", type=float, default=0.1,
                      help="held-out fraction written as the 'test' split (default 0.1)")
    pack.add_argument("--seed", type=int, default=0)
    pack.set_defaults(handler=cmd_data_pack)
    return parser


def cmd_validate(args) -> int:
    from gentrain.spec import dump_yaml, load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.print:
        print(dump_yaml(spec), end="")
    print(f"{args.spec}: ok ({spec.job.type}, {spec.strategy.name}/{spec.strategy.precision}, "
          f"{spec.scaling.num_workers} workers, {spec.train.steps} steps)")
    return 0


def cmd_list(args) -> int:
    from gentrain.registry import job_types
    from gentrain.spec import bundled_specs

    print("job types:")
    for name, job_type in sorted(job_types().items()):
        strategies = ",".join(job_type.supports.strategies)
        print(f"  {name:<14} {job_type.description} [strategies: {strategies}]")
    print("bundled specs:")
    for name in bundled_specs():
        print(f"  {name}")
    return 0


def cmd_run(args) -> int:
    from ray.train import TrainingFailedError

    from gentrain.launch.local import run
    from gentrain.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    try:
        summary = run(spec)
    except TrainingFailedError as exc:
        print(f"error: training {spec.name} failed: {exc}\n"
              f"Checkpoints written before the failure are kept in {spec.run_dir}; "
              "fix the cause and run the same command to continue from the latest.",
              file=sys.stderr)
        return 1
    print()
    print(f"[gentrain] done: {spec.name}")
    print(f"  checkpoints : {summary.checkpoint or 'none'}")
    print(f"  samples     : {summary.samples or 'none'}")
    if summary.mlflow_run_id:
        print(f"  mlflow run  : {summary.mlflow_run_id}")
        print(f"  view it     : {summary.mlflow_pointer}")
    return 0


def cmd_data_pack(args) -> int:
    from gentrain.data.pack import pack_source

    index = pack_source(args.source, args.out, per_shard=args.per_shard,
                        test_fraction=args.test_fraction, seed=args.seed)
    splits = ", ".join(f"{name}: {info['total']} samples in {len(info['shards'])} shards"
                       for name, info in index["splits"].items())
    print(f"[gentrain] packed {args.source} into {args.out} ({splits})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the latest checkpoint is kept and `gentrain run` continues from it",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
