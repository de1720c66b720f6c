"""The source roots must never shadow Python's standard `platform` module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_source_roots_have_no_init_file():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "jobs" / "__init__.py").exists()


def test_stdlib_platform_still_imports_from_the_repo_root():
    code = "import platform, torch; print(platform.system(), platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    system, path = out.split()
    assert system == "Linux"
    assert str(ROOT) not in path  # the standard library's, not our folder
