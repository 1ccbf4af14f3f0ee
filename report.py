"""
The report of the IMDb experiment, from the evaluation rows every method run wrote: the frontier's
tables, each method's mean over seeds with its 95% confidence interval, the verdict of each
comparison with the SFT model, and the plots (the reward-vs-KL frontier, the training curves).

With one seed a point's ± is the standard error over the evaluation prefixes. With several, the
numbers are means over the seeds' training runs and the ± is the half-width of the t-interval over
seeds: mean ± t(0.975, n - 1) s / sqrt(n), s the standard deviation of the n seeds' values. Only a
seed-to-seed interval says whether a method beats another; the prefix standard error cannot.
"""
import functools
import math

import numpy as np

from checkpoint import atomic_write, read_jsonl
from cli import UserError
from evaluate import shown_kl

EVAL_NUMBERS = ("step", "n", "kl", "reward", "reward_se", "judge", "judge_se", "distinct", "reference_logp")
KL_BUDGETS = (3, 6, 12)
GAIN_BUDGET = 10  # the comparison with SFT: each method's best point at KL <= 10 nats


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_rows(jsonl, seed=0):
    """Evaluation rows, the last one kept for each (method, setting, step): a resumed run repeats a few.
    Each is tagged with the seed of the run that wrote it."""
    rows = read_jsonl(jsonl, valid=lambda row: isinstance(row, dict) and all(is_number(row.get(k)) for k in EVAL_NUMBERS)
                      and isinstance(row.get("method"), str) and isinstance(row.get("setting"), str), what="an evaluation row")
    return [{**row, "seed": seed} for row in {(row["method"], row["setting"], row["step"]): row for row in rows}.values()]


# ---------------------------------------------------------------------------- confidence intervals over seeds
@functools.lru_cache(maxsize=None)  # the same few (p, df) for every point of a report
def t_quantile(p, df):
    """The p-quantile (p >= 1/2) of Student's t with df degrees of freedom: bisection on its CDF,
    1/2 plus the density integrated from 0 by Simpson's rule (no scipy)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x):
        t = np.linspace(0.0, x, 4001)
        density = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + x / 12000 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def interval(values, level=0.95):
    """(mean, half-width) of the t-interval of the mean of independent values; half-width nan for one value."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), t_quantile((1 + level) / 2, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))


def seeds_of(rows):
    return sorted({row["seed"] for row in rows})


def over_seeds(rows):
    """One row per (method, setting, step): the mean of each number over the seeds, with the interval's
    half-width (`<key>_ci`) for the reward, the judge and the KL. Every (method, setting, step) must have
    a row from every seed: a missing or unfinished seed is an error, never averaged away."""
    seeds, groups = seeds_of(rows), {}
    for row in rows:
        groups.setdefault((row["method"], row["setting"], row["step"]), []).append(row)
    out = []
    for (method, setting, step), group in groups.items():
        have = sorted(row["seed"] for row in group)
        if have != seeds:
            raise UserError(f"{method} {setting} step {step} has evaluations of seeds {have}, not of every seed {seeds}: "
                            f"finish the missing runs (python train.py --stage methods with the same --seeds) first")
        mean = {"method": method, "setting": setting, "step": step, "seeds": len(group)}
        for key in ("n", "kl", "reward", "judge", "distinct", "reference_logp"):
            mean[key], half = interval([row[key] for row in group])
            if key in ("kl", "reward", "judge"):
                mean[key + "_ci"] = half
        for key in ("reward_se", "judge_se"):  # the prefix standard error, kept for one seed
            mean[key] = float(np.mean([row[key] for row in group]))
        for key in (k for k in group[0] if k.startswith("implicit_acc")):  # DPO's implicit-reward accuracies
            mean[key] = float(np.mean([row[key] for row in group]))
        out.append(mean)
    return out


def spread(row, key):
    """"mean ± half" of a key: the seeds' 95% interval, or with one seed the prefix standard error."""
    half = row.get(key + "_ci", float("nan"))
    return f"{row[key]:.3f} ± {row[key + '_se'] if row['seeds'] == 1 else half:.3f}"


# ---------------------------------------------------------------------------- tables
def final_points(rows):
    """The last step of each (method, setting) series."""
    final = {}
    for row in rows:
        key = (row["method"], row["setting"])
        if key not in final or row["step"] >= final[key]["step"]:
            final[key] = row
    return list(final.values())


def frontier_table(means):
    """The final point of each method: reward and second judge, and the degeneration signals
    (distinct-token ratio, mean per-token log-prob under the reference)."""
    seeds = means[0]["seeds"] if means else 1
    lines = [f"| method | setting | step | n | KL | reward | judge | distinct | ref logp |  ({interval_words(seeds)})",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['step']} | {r['n']:.0f} | {shown_kl(r['kl'], 2)} | {spread(r, 'reward')} | "
              f"{spread(r, 'judge')} | {r['distinct']:.2f} | {r['reference_logp']:.2f} |" for r in final_points(means)]
    return lines


def interval_words(seeds):
    return "±: one standard error over the prefixes, one seed" if seeds == 1 else f"±: 95% interval over {seeds} seeds"


def best_under(rows, method, budget):
    """Per seed, the point of `method` (any setting, any step) with the highest reward at KL <= budget: {seed: row}."""
    best = {}
    for row in rows:
        if row["method"] == method and row["kl"] <= budget and (row["seed"] not in best or row["reward"] > best[row["seed"]]["reward"]):
            best[row["seed"]] = row
    return best


def kl_budget_table(rows):
    """Each method's best reward with KL at most 3, 6 and 12 nats, taken in each seed, then its mean over
    seeds with the interval. The best of several noisy points leans high by about a standard error."""
    seeds = seeds_of(rows)
    lines = ["| method | " + " | ".join(f"best reward at KL <= {b}" for b in KL_BUDGETS) + f" |  ({interval_words(len(seeds))})",
             "|---|" + "---|" * len(KL_BUDGETS)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for budget in KL_BUDGETS:
            best = best_under(rows, method, budget)
            if len(best) < len(seeds):  # a seed with no point under the budget: no mean to give
                cells.append("-")
                continue
            points = list(best.values())
            reward, half = interval([p["reward"] for p in points])
            kl = float(np.mean([p["kl"] for p in points]))
            shown = points[0]["reward_se"] if len(points) == 1 else half
            cells.append(f"{reward:.3f} ± {shown:.3f} (KL {shown_kl(kl, 1)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def verdict(low, high):
    return "higher" if low > 0 else "lower" if high < 0 else "not distinguishable"


def comparison_table(rows, budget=GAIN_BUDGET):
    """Each method's gain over the SFT model at its best point with KL <= budget, seed by seed (each seed's
    best point minus that seed's SFT point), in reward and in the second judge's score of the same point:
    the mean gain with its 95% interval, and a verdict only where the interval excludes 0."""
    seeds = seeds_of(rows)
    sft = {row["seed"]: row for row in rows if row["method"] == "SFT"}
    if len(seeds) < 2 or sorted(sft) != seeds:
        return [f"(the comparison with SFT needs 2 or more seeds and the SFT point, --methods sft_point; "
                f"this report has {len(seeds)} seed{'s' if len(seeds) != 1 else ''})"]
    lines = [f"| method | gain in reward over SFT at KL <= {budget} | verdict | gain in judge | verdict |  "
             f"(95% interval over {len(seeds)} seeds)", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "SFT"):
        best = best_under(rows, method, budget)
        if sorted(best) != seeds:
            lines.append(f"| {method} | no point at KL <= {budget} in every seed | - | - | - |")
            continue
        cells = []
        for key in ("reward", "judge"):
            gain, half = interval([best[s][key] - sft[s][key] for s in seeds])
            cells += [f"{gain:+.3f} ± {half:.3f}", verdict(gain - half, gain + half)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def implicit_table(means):
    """Eq. 5 measured: how often beta log(pi / pi_ref) orders held-out and training pairs as the ground
    truth does, for each method with a reference (DPO, IPO, KTO)."""
    lines = ["| method | setting | step | implicit-reward accuracy, held-out pairs | on training pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['step']} | {r['implicit_acc_heldout']:.3f} | {r['implicit_acc_train']:.3f} |"
              for r in means if "implicit_acc_heldout" in r]
    return lines


# ---------------------------------------------------------------------------- plots
def plot_frontier(means, path, ground_truth="n-gram classifier"):
    """Reward vs KL, one colour per method, like the paper's Figure 2 (left): every setting and evaluation
    a point (a mean over seeds, with the 95% interval of the reward and of the KL as bars; with one seed,
    one standard error of the reward); beside it the same points scored by the second judge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = means[0]["seeds"] if means else 1
    methods = list(dict.fromkeys(row["method"] for row in means))  # in the order they come
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, key, title in ((axes[0], "reward", f"ground-truth reward ({ground_truth})"),
                           (axes[1], "judge", "second judge (GPT-trunk classifier)")):
        for method in methods:
            points = [r for r in means if r["method"] == method]
            style = dict(marker="*", markersize=12, zorder=3) if len(points) == 1 else dict(marker="o", markersize=4, alpha=0.8)
            yerr = [r[key + "_se"] if seeds == 1 else r[key + "_ci"] for r in points]
            xerr = None if seeds == 1 else [[min(r["kl_ci"], r["kl"]) for r in points], [r["kl_ci"] for r in points]]  # KL >= 0
            ax.errorbar([r["kl"] for r in points], [r[key] for r in points], yerr=yerr, xerr=xerr,
                        label=method, capsize=2, linestyle="none", **style)
        ax.set_xlabel("KL(pi || pi_ref)  [nats, sum over generated tokens]")
        ax.set_ylabel(f"mean {key}  P(positive)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bars = "one standard error over the prefixes" if seeds == 1 else f"95% interval over {seeds} seeds"
    fig.suptitle(f"IMDb sentiment: reward vs KL frontier (bars: {bars})")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


CURVES = (("loss", "training loss"), ("rewards/margins", "implicit reward margin (DPO's family)"),
          ("rewards/accuracies", "implicit reward accuracy, training batches"), ("kl", "KL(pi || pi_ref) at evaluations"),
          ("reward", "mean reward at evaluations"))


def plot_curves(runs, path):
    """The training curves of every method run against its step: its trainer's loss and, for DPO's family,
    the implicit reward's margin and accuracy on the training batches (its log, every log interval), and
    the KL and mean reward of its evaluations (eval.jsonl). runs: {label: (log rows, evaluation rows)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.4 * len(CURVES), 4))
    for label, (log, evaluations) in runs.items():
        for ax, (key, _) in zip(axes, CURVES):
            rows = evaluations if key in ("kl", "reward") else log
            points = [(row["step"], row[key]) for row in rows if is_number(row.get(key)) and is_number(row.get("step"))]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key in ("kl", "reward") else None, markersize=3, linewidth=1)
    for ax, (_, title) in zip(axes, CURVES):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle("training curves of each method run")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
