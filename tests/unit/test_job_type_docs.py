"""docs/job-types.md shows the example family's files exactly as the test installs them."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "toy_family"


def test_the_guide_shows_the_installed_example_verbatim():
    guide = (ROOT / "docs" / "job-types.md").read_text()
    for path, fence in (("pyproject.toml", "toml"), ("acme_density/family.py", "python"),
                        ("acme_density/specs/debug.yaml", "yaml")):
        assert f"```{fence}\n{(FIXTURE / path).read_text()}```" in guide, f"docs/job-types.md: {path} differs"


def test_the_readme_links_the_guide():
    assert "(docs/job-types.md)" in (ROOT / "README.md").read_text()
