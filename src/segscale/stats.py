"""Variability statistics over repeated runs: a metric's spread, and the agreement between runs on
per-case scores (intraclass correlation), with their confidence intervals. NumPy and SciPy only.

The ICC is McGraw & Wong's ICC(A,1) (Shrout & Fleiss' ICC(2,1)): two-way random effects,
absolute agreement, single measurement. Cases are the targets and runs the raters: the runs are
a random sample of the runs one could have made (other seeds), the question is how far one run's
per-case score can be trusted as that of any other run, and a systematic offset between runs
(one run better on every case) is disagreement, which only the absolute-agreement form counts.

    McGraw, K. O., & Wong, S. P. (1996). Forming inferences about some intraclass correlation
    coefficients. Psychological Methods, 1(1), 30–46 (Table 4: ICC(A,1); Table 7: its CI).
    Shrout, P. E., & Fleiss, J. L. (1979). Intraclass correlations: uses in assessing rater
    reliability. Psychological Bulletin, 86(2), 420–428.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Spread:
    """A metric over n runs: mean, sample SD (n − 1), the mean's 95% CI (Student's t), min, max."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: list[float] | np.ndarray, confidence: float = 0.95) -> Spread:
    """Raises ValueError for no values; NaN values are refused (a run without a score)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("spread of no values")
    if np.isnan(x).any():
        raise ValueError("spread: a value is NaN")
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Spread(1, mean, math.nan, math.nan, math.nan, mean, mean)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Spread(n, mean, sd, mean - half, mean + half, float(x.min()), float(x.max()))


@dataclass(frozen=True)
class Agreement:
    """ICC(A,1) between runs on per-case scores, its CI, and the two-way ANOVA behind it (the F
    test of a systematic difference between runs)."""

    icc: float
    ci_low: float
    ci_high: float
    cases: int
    runs: int
    f_runs: float  # MS(runs) / MS(error)
    p_runs: float  # P(F ≥ f_runs) with (runs − 1, (cases − 1)(runs − 1)) degrees of freedom
    ms_cases: float
    ms_runs: float
    ms_error: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def agreement(scores: np.ndarray, confidence: float = 0.95) -> Agreement:
    """ICC(A,1) of a (cases, runs) matrix of scores (McGraw & Wong 1996, Tables 4 and 7).
    Bit-identical runs give ICC 1 with the CI [1, 1]; one score for every case and run, NaN
    (no variance). Raises ValueError with fewer than 2 cases
    or 2 runs, or a NaN score (a case a run could not score: drop it first)."""
    y = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"agreement needs (cases ≥ 2, runs ≥ 2) scores, got shape {y.shape}")
    if np.isnan(y).any():
        raise ValueError("agreement: a score is NaN; keep the cases every run scored")
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc = ss_rows / (n - 1), ss_cols / (k - 1)
    mse = max(ss_error, 0.0) / ((n - 1) * (k - 1))
    if msr == 0 and msc == 0 and mse == 0:  # one score everywhere: no variance to apportion
        return Agreement(math.nan, math.nan, math.nan, n, k, math.nan, math.nan, msr, msc, mse)
    if mse <= 1e-15 * msr and msc <= 1e-15 * msr:
        # every run gave every case the same score: perfect agreement
        return Agreement(1.0, 1.0, 1.0, n, k, math.nan, math.nan, msr, msc, mse)
    icc = (msr - mse) / (msr + (k - 1) * mse + k / n * (msc - mse))
    # the CI of ICC(A,1): McGraw & Wong (1996), Table 7, case 2A, with Satterthwaite's df v
    alpha = 1 - confidence
    a = k * icc / (n * (1 - icc)) if icc < 1 else math.inf
    b = 1 + k * icc * (n - 1) / (n * (1 - icc)) if icc < 1 else math.inf
    fc = msc / mse if mse > 0 else math.inf
    if math.isfinite(a) and math.isfinite(fc):
        v = (a * msc + b * mse) ** 2 / (
            (a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1))
        )
        f_upper = sps.f.ppf(1 - alpha / 2, n - 1, v)
        f_lower = sps.f.ppf(1 - alpha / 2, v, n - 1)
        low = n * (msr - f_upper * mse) / (f_upper * (k * msc + (k * n - k - n) * mse) + n * msr)
        high = n * (f_lower * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_lower * msr)
    else:
        low = high = math.nan
    f_runs = msc / mse if mse > 0 else math.inf
    p_runs = float(sps.f.sf(f_runs, k - 1, (n - 1) * (k - 1))) if mse > 0 else 0.0
    return Agreement(
        float(icc), float(low), float(high), n, k, float(f_runs), p_runs, msr, msc, mse
    )


@dataclass(frozen=True)
class Paired:
    """B − A on paired scores (e.g. per-case Dice of two models on the same cases): the mean
    difference with its 95% CI (Student's t), the paired t test and the Wilcoxon signed-rank
    test (two-sided; exact for small n without ties, SciPy's default)."""

    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    w: float
    p_wilcoxon: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paired(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> Paired:
    """Raises ValueError for fewer than 2 pairs, unequal lengths or a NaN. When every pair differs
    by the same amount the t test is undefined (p_t NaN) and only the Wilcoxon test speaks."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores of different shapes: {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("paired: a score is NaN; keep the cases both scored")
    d = y - x
    s = spread(d)
    if not np.any(d):  # identical scores: no difference, nothing to test
        return Paired(d.size, 0.0, 0.0, 0.0, math.nan, 1.0, math.nan, 1.0)
    w = sps.wilcoxon(y, x)
    if s.sd <= 1e-9 * abs(s.mean):  # the same difference on every case: t is undefined (0 SD)
        t_stat, p_t = math.nan, math.nan
    else:
        t = sps.ttest_rel(y, x)
        t_stat, p_t = float(t.statistic), float(t.pvalue)
    return Paired(
        d.size, s.mean, s.ci_low, s.ci_high, t_stat, p_t, float(w.statistic), float(w.pvalue)
    )
