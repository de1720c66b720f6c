"""The settings of the sample metrics (IS splits, KID subsets), checked against the sample count.

    from gentrain.metrics.settings import MetricSettings, CLI_NAMES
    settings = MetricSettings(is_splits=10, kid_subsets=100, kid_subset_size=None)  # None: min(1000, n // 2)
    problems = settings.problems(["fid", "kid", "is"], n=1000, names=CLI_NAMES)     # [] when usable

Set in a spec's eval section (evaluation during training) or with `gentrain eval
--is-splits/--kid-subsets/--kid-subset-size`. The checks live here so both say the same
thing, each in its own words (`eval.kid_subset_size` or `--kid-subset-size`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gentrain.metrics.kid import check_kid_settings

# KID and precision/recall use at most this many rows of each side (their cost grows with the square).
MAX_KEPT_FEATURES = 10_000

SPEC_NAMES = {"is_splits": "is_splits", "kid_subsets": "kid_subsets", "kid_subset_size": "kid_subset_size",
              "n": "fid_samples"}
CLI_NAMES = {"is_splits": "--is-splits", "kid_subsets": "--kid-subsets", "kid_subset_size": "--kid-subset-size",
             "n": "--n"}


@dataclass(frozen=True)
class MetricSettings:
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int | None = None  # None: min(1000, n // 2) of the smaller set
    kid_seed: int = 0
    pr_k: int = 3

    @classmethod
    def of_spec(cls, eval_section) -> "MetricSettings":
        return cls(eval_section.is_splits, eval_section.kid_subsets, eval_section.kid_subset_size)

    def problems(self, metrics, n: int, names: dict[str, str], bounds_checked: bool = False) -> list[str]:
        """What makes these settings unusable for `n` samples of each side (as far as known before sampling).

        bounds_checked: the lower bounds (the spec's field metadata) were reported already; say only
        what depends on n.
        """
        below_bounds = self.is_splits < 1 or self.kid_subsets < 2 or (self.kid_subset_size or 2) < 2
        if bounds_checked and below_bounds:
            return []
        found = []
        if "is" in metrics and not 1 <= self.is_splits <= n:
            found.append(f"{names['is_splits']}: {self.is_splits} must be between 1 and {names['n']} ({n}): "
                         "the Inception Score cuts the samples into that many splits")
        if "kid" in metrics:
            rows = min(n, MAX_KEPT_FEATURES)
            try:
                check_kid_settings(self.kid_subsets, self.kid_subset_size, rows, rows, names)
            except ValueError as error:
                found.append(str(error))
        return found

    def as_dict(self) -> dict:
        return asdict(self)
