"""The FID Inception weight file: where it is, what it must hold, and loading it.

    export GENTRAIN_INCEPTION_WEIGHTS=~/models/pt_inception-2015-12-05-6726825d.pth

The file is pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph, a state
dict of torchvision's Inception3 layout with a 1008-way fc and no auxiliary head.
gentrain never downloads it (workers of a cluster often cannot reach the internet,
and a silent download hides which weights produced a number): it is read from a
path given explicitly or from $GENTRAIN_INCEPTION_WEIGHTS.

EXPECTED_CONVOLUTIONS below is written out layer by layer from the architecture,
independently of the network code in inception.py, so that a test can hold the two
against each other. Every line is one conv + batch-norm unit:
`name in_channels out_channels kernel_height kernel_width`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE_NAME}"
WEIGHTS_ENV = "GENTRAIN_INCEPTION_WEIGHTS"
NUM_CLASSES = 1008  # 1000 ImageNet classes + 8 unused outputs of the TF graph
POOL_DIM = 2048

EXPECTED_CONVOLUTIONS = """
Conv2d_1a_3x3 3 32 3 3
Conv2d_2a_3x3 32 32 3 3
Conv2d_2b_3x3 32 64 3 3
Conv2d_3b_1x1 64 80 1 1
Conv2d_4a_3x3 80 192 3 3
Mixed_5b.branch1x1 192 64 1 1
Mixed_5b.branch5x5_1 192 48 1 1
Mixed_5b.branch5x5_2 48 64 5 5
Mixed_5b.branch3x3dbl_1 192 64 1 1
Mixed_5b.branch3x3dbl_2 64 96 3 3
Mixed_5b.branch3x3dbl_3 96 96 3 3
Mixed_5b.branch_pool 192 32 1 1
Mixed_5c.branch1x1 256 64 1 1
Mixed_5c.branch5x5_1 256 48 1 1
Mixed_5c.branch5x5_2 48 64 5 5
Mixed_5c.branch3x3dbl_1 256 64 1 1
Mixed_5c.branch3x3dbl_2 64 96 3 3
Mixed_5c.branch3x3dbl_3 96 96 3 3
Mixed_5c.branch_pool 256 64 1 1
Mixed_5d.branch1x1 288 64 1 1
Mixed_5d.branch5x5_1 288 48 1 1
Mixed_5d.branch5x5_2 48 64 5 5
Mixed_5d.branch3x3dbl_1 288 64 1 1
Mixed_5d.branch3x3dbl_2 64 96 3 3
Mixed_5d.branch3x3dbl_3 96 96 3 3
Mixed_5d.branch_pool 288 64 1 1
Mixed_6a.branch3x3 288 384 3 3
Mixed_6a.branch3x3dbl_1 288 64 1 1
Mixed_6a.branch3x3dbl_2 64 96 3 3
Mixed_6a.branch3x3dbl_3 96 96 3 3
Mixed_6b.branch1x1 768 192 1 1
Mixed_6b.branch7x7_1 768 128 1 1
Mixed_6b.branch7x7_2 128 128 1 7
Mixed_6b.branch7x7_3 128 192 7 1
Mixed_6b.branch7x7dbl_1 768 128 1 1
Mixed_6b.branch7x7dbl_2 128 128 7 1
Mixed_6b.branch7x7dbl_3 128 128 1 7
Mixed_6b.branch7x7dbl_4 128 128 7 1
Mixed_6b.branch7x7dbl_5 128 192 1 7
Mixed_6b.branch_pool 768 192 1 1
Mixed_6c.branch1x1 768 192 1 1
Mixed_6c.branch7x7_1 768 160 1 1
Mixed_6c.branch7x7_2 160 160 1 7
Mixed_6c.branch7x7_3 160 192 7 1
Mixed_6c.branch7x7dbl_1 768 160 1 1
Mixed_6c.branch7x7dbl_2 160 160 7 1
Mixed_6c.branch7x7dbl_3 160 160 1 7
Mixed_6c.branch7x7dbl_4 160 160 7 1
Mixed_6c.branch7x7dbl_5 160 192 1 7
Mixed_6c.branch_pool 768 192 1 1
Mixed_6d.branch1x1 768 192 1 1
Mixed_6d.branch7x7_1 768 160 1 1
Mixed_6d.branch7x7_2 160 160 1 7
Mixed_6d.branch7x7_3 160 192 7 1
Mixed_6d.branch7x7dbl_1 768 160 1 1
Mixed_6d.branch7x7dbl_2 160 160 7 1
Mixed_6d.branch7x7dbl_3 160 160 1 7
Mixed_6d.branch7x7dbl_4 160 160 7 1
Mixed_6d.branch7x7dbl_5 160 192 1 7
Mixed_6d.branch_pool 768 192 1 1
Mixed_6e.branch1x1 768 192 1 1
Mixed_6e.branch7x7_1 768 192 1 1
Mixed_6e.branch7x7_2 192 192 1 7
Mixed_6e.branch7x7_3 192 192 7 1
Mixed_6e.branch7x7dbl_1 768 192 1 1
Mixed_6e.branch7x7dbl_2 192 192 7 1
Mixed_6e.branch7x7dbl_3 192 192 1 7
Mixed_6e.branch7x7dbl_4 192 192 7 1
Mixed_6e.branch7x7dbl_5 192 192 1 7
Mixed_6e.branch_pool 768 192 1 1
Mixed_7a.branch3x3_1 768 192 1 1
Mixed_7a.branch3x3_2 192 320 3 3
Mixed_7a.branch7x7x3_1 768 192 1 1
Mixed_7a.branch7x7x3_2 192 192 1 7
Mixed_7a.branch7x7x3_3 192 192 7 1
Mixed_7a.branch7x7x3_4 192 192 3 3
Mixed_7b.branch1x1 1280 320 1 1
Mixed_7b.branch3x3_1 1280 384 1 1
Mixed_7b.branch3x3_2a 384 384 1 3
Mixed_7b.branch3x3_2b 384 384 3 1
Mixed_7b.branch3x3dbl_1 1280 448 1 1
Mixed_7b.branch3x3dbl_2 448 384 3 3
Mixed_7b.branch3x3dbl_3a 384 384 1 3
Mixed_7b.branch3x3dbl_3b 384 384 3 1
Mixed_7b.branch_pool 1280 192 1 1
Mixed_7c.branch1x1 2048 320 1 1
Mixed_7c.branch3x3_1 2048 384 1 1
Mixed_7c.branch3x3_2a 384 384 1 3
Mixed_7c.branch3x3_2b 384 384 3 1
Mixed_7c.branch3x3dbl_1 2048 448 1 1
Mixed_7c.branch3x3dbl_2 448 384 3 3
Mixed_7c.branch3x3dbl_3a 384 384 1 3
Mixed_7c.branch3x3dbl_3b 384 384 3 1
Mixed_7c.branch_pool 2048 192 1 1
"""

# Batch-norm's step counter: saved by newer torch versions, absent from older files;
# it plays no part in inference, so either way is accepted.
OPTIONAL_SUFFIX = ".bn.num_batches_tracked"


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weight file is not where it was looked for."""


class InceptionWeightsMismatchError(ValueError):
    """A file was found, but it is not the FID Inception state dict."""


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weight file and its shape (num_batches_tracked included, as torch saves it)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for line in EXPECTED_CONVOLUTIONS.strip().splitlines():
        name, *sizes = line.split()
        in_channels, out_channels, height, width = (int(size) for size in sizes)
        shapes[f"{name}.conv.weight"] = (out_channels, in_channels, height, width)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{buffer}"] = (out_channels,)
        shapes[f"{name}{OPTIONAL_SUFFIX}"] = ()
    shapes["fc.weight"] = (NUM_CLASSES, POOL_DIM)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def default_weights_path() -> Path:
    """Where gentrain looks when neither a path nor $GENTRAIN_INCEPTION_WEIGHTS is given."""
    return Path.home() / ".cache" / "gentrain" / WEIGHTS_FILE_NAME


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The explicit path if given, else $GENTRAIN_INCEPTION_WEIGHTS, else the default place
    (~/.cache/gentrain/); an error that says how to get the file."""
    where = "the path given" if path else f"${WEIGHTS_ENV}"
    chosen = path or os.environ.get(WEIGHTS_ENV)
    if not chosen:
        if default_weights_path().is_file():
            return default_weights_path()
        raise InceptionWeightsNotFoundError(_missing_message(None, "no path was given, "
                                                             f"${WEIGHTS_ENV} is not set and "
                                                             f"{default_weights_path()} does not exist"))
    resolved = Path(chosen).expanduser()
    if not resolved.is_file():
        raise InceptionWeightsNotFoundError(_missing_message(resolved, f"{where} points to {resolved}, "
                                                             "which is not a file"))
    return resolved


def load_state_dict(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict checked against the expected keys and shapes, sha256 of the file)."""
    resolved = resolve_weights_path(path)
    try:
        state = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise InceptionWeightsMismatchError(f"could not read {resolved} as a torch state dict ({error}); "
                                            f"download {WEIGHTS_FILE_NAME} again from {WEIGHTS_URL}") from error
    if not isinstance(state, dict):
        raise InceptionWeightsMismatchError(f"{resolved} holds a {type(state).__name__}, not a state dict")
    check_state_dict(state, source=str(resolved))
    return complete_state_dict(state), file_sha256(resolved)


def check_state_dict(state: dict, source: str = "state dict") -> None:
    """Raise InceptionWeightsMismatchError naming the missing, unexpected and misshapen keys."""
    expected = expected_state_dict_shapes()
    required = {key for key in expected if not key.endswith(OPTIONAL_SUFFIX)}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = [f"{key}: {tuple(state[key].shape)}, expected {expected[key]}" for key in state
                 if key in expected and tuple(state[key].shape) != expected[key]]
    if missing or unexpected or misshapen:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise InceptionWeightsMismatchError(f"{source} is not the FID Inception state dict "
                                            f"({WEIGHTS_FILE_NAME}): {'; '.join(problems)}")


def complete_state_dict(state: dict) -> dict:
    """Add the optional batch-norm counters a file may lack, so strict loading accepts it."""
    completed = dict(state)
    for key in expected_state_dict_shapes():
        if key.endswith(OPTIONAL_SUFFIX) and key not in completed:
            completed[key] = torch.tensor(0, dtype=torch.long)
    return completed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(path: Path | None, what: str) -> str:
    target = path or Path("~/.cache/gentrain") / WEIGHTS_FILE_NAME
    return (f"FID Inception weights not found: {what}. gentrain never downloads weights. Get the file once "
            f"(about 95 MB):\n    curl -L --create-dirs -o {target} {WEIGHTS_URL}\n"
            f"({Path('~/.cache/gentrain') / WEIGHTS_FILE_NAME} is found without any setting) and on "
            f"other paths either export {WEIGHTS_ENV}={target} (on every machine that computes metrics) or pass "
            "its path explicitly: the spec field eval.inception_weights (e.g. the override "
            f"eval.inception_weights={target}), `gentrain eval ... --inception-weights {target}`, or "
            "InceptionFeatures(weights=...) in Python. To score without Inception, train a classifier on "
            "your data (gentrain run classifier/debug) and use --extractor / eval.extractor classifier:RUN.")
