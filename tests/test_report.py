"""The report over seeds: the t-interval against a direct computation and published quantiles, and
aggregation that refuses a missing seed instead of averaging over the seeds that are there."""
import math

import pytest

import report
from cli import UserError

# Student's t 0.975-quantiles from published tables (df: value)
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_equals_the_published_table(df):
    assert report.t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-4)


def test_interval_is_the_t_interval_computed_by_hand():
    values = [0.51, 0.55, 0.60]
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # the sample standard deviation, n - 1
    got_mean, half = report.interval(values)
    assert got_mean == pytest.approx(mean, abs=1e-12)
    assert half == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6)
    assert math.isnan(report.interval([0.5])[1])  # one seed: no interval


def row(method, seed, step=0, reward=0.5, kl=0.0, judge=0.5, setting=""):
    return {"method": method, "setting": setting, "step": step, "seed": seed, "n": 8, "kl": kl, "reward": reward,
            "reward_se": 0.01, "judge": judge, "judge_se": 0.01, "distinct": 0.9, "reference_logp": -6.0}


def test_the_mean_over_seeds_has_every_seed_or_is_refused():
    rows = [row("DPO", s, step, reward=0.5 + 0.01 * s) for s in range(3) for step in (0, 10)]
    means = {(r["method"], r["step"]): r for r in report.over_seeds(rows)}
    assert means[("DPO", 10)]["reward"] == pytest.approx(0.51) and means[("DPO", 10)]["seeds"] == 3
    assert means[("DPO", 10)]["reward_ci"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    unfinished = [r for r in rows if not (r["seed"] == 2 and r["step"] == 10)]  # seed 2 stopped before step 10
    with pytest.raises(UserError, match=r"DPO  step 10 has evaluations of seeds \[0, 1\], not of every seed \[0, 1, 2\]"):
        report.over_seeds(unfinished)


@pytest.mark.parametrize("gains, verdict", [([0.10, 0.12, 0.11], "higher"), ([0.10, -0.10, 0.02], "not distinguishable"),
                                            ([-0.05, -0.06, -0.04], "lower")])
def test_a_method_is_called_higher_or_lower_only_where_the_interval_excludes_zero(gains, verdict):
    rows = [row("SFT", s, reward=0.5, judge=0.6) for s in range(3)]
    rows += [row("DPO", s, step=100, reward=0.5 + g, kl=5.0, judge=0.6 + g) for s, g in enumerate(gains)]
    rows += [row("DPO", s, step=200, reward=0.9, kl=20.0) for s in range(3)]  # beyond KL 10: not counted
    line = next(line for line in report.comparison_table(rows) if line.startswith("| DPO"))
    mean, half = sum(gains) / 3, report.t_quantile(0.975, 2) * math.sqrt(sum((g - sum(gains) / 3) ** 2 for g in gains) / 2) / math.sqrt(3)
    assert line == f"| DPO | {mean:+.3f} ± {half:.3f} | {verdict} | {mean:+.3f} ± {half:.3f} | {verdict} |"


def test_one_seed_makes_no_comparison_and_the_budget_table_needs_every_seed():
    rows = [row("SFT", 0), row("DPO", 0, step=10, reward=0.6, kl=2.0)]
    assert "needs 2 or more seeds" in report.comparison_table(rows)[0]
    two = [row("DPO", 0, step=10, reward=0.6, kl=2.0), row("DPO", 1, step=10, reward=0.7, kl=4.0)]
    line = next(line for line in report.kl_budget_table(two) if line.startswith("| DPO"))
    assert line.split(" | ")[1] == "-"  # at KL <= 3 only seed 0 has a point: no mean over seeds
    assert line.split(" | ")[2].startswith("0.650 ± ")
