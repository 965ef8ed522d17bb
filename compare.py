"""Paired comparisons: two models scored on the same test digits, and whether the difference is
more than noise.

Two models tested on the same digits are compared digit by digit, in two ways:

- the difference of their accuracies with a 95% interval from a paired bootstrap over the digits
  (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993): the digits are drawn again with
  replacement, the same draw for both models, and the interval is the middle 95% of the resampled
  differences. A digit's score is 1 or 0 on the clean test set; on the held-out (or trained-on)
  families, the share of their settings at which the model gets it right;
- McNemar's exact test (McNemar 1947; Dietterich 1998 recommends it for comparing two
  classifiers on one test set): of the answers where one model is right and the other wrong, is
  each model's share what a fair coin gives? On a kind of family every (digit, setting) is one
  answer.

"Better" or "worse" means both at once: the interval lies above (below) 0 and p < 0.05; else the
difference is "within the noise". Pooled over seeds: a digit's score is its mean over the seeds,
and McNemar counts the answers of every seed.

``plot.py`` adds each pair of a run's models to report.md (``report_lines``), and each model's
error on the test set's two halves (``halves_lines``). From the command line, one model of two runs
that plot.py has swept, as the README's ablation pairs each variant with the recipe:

    python compare.py runs/ink-no-dropout runs/seeds-ink   # lenet5_reg: the first minus the second
    python compare.py RUN_A RUN_B --model lenet5
"""

import math
import sys
from pathlib import Path

import numpy as np

import cli
import runs
from robustness import FAMILIES, jobs_by_model, kind, unpacked
from runs import RunError

RESAMPLES = 2000
BOOTSTRAP_SEED = 20261207
P_VALUE = 0.05
MEASURES = {
    "clean": "clean test set",
    "held_out": "held-out families",
    "trained_on": "trained-on families",
}
# The challenger first in each pair report.md compares.
PAIRS = [("lenet5_reg", "lenet5"), ("lenet5_reg", "mlp"), ("lenet5", "mlp")]
# The official test set: its first 5,000 digits were written by NIST's training-set writers, the
# last 5,000 by its test-set writers; the MNIST page (LeCun, Cortes and Burges) calls the first
# half the cleaner and easier.
HALF = 5000
LECUN_1998_ERROR = 0.0095  # LeNet-5, "Gradient-based learning applied to document recognition"


def right(job, measure):
    """(settings, digits) bool array: which test digits a job of robustness.json gets right, on
    the clean set ("clean", one row), at each setting of the held-out or the trained-on families
    ("held_out", "trained_on") or at each of one family's."""
    size, families = job["right"]["digits"], job["right"]["families"]
    if measure == "clean":
        return unpacked(job["right"]["clean"], size)[None]
    kinds = {"held_out": False, "trained_on": True}
    if measure in kinds:
        chosen = [family for family, f in FAMILIES.items() if f.trained_on == kinds[measure]]
    else:
        chosen = [measure]
    return np.stack([unpacked(bits, size) for family in chosen for bits in families[family]])


def bootstrap(a, b, resamples=RESAMPLES, seed=BOOTSTRAP_SEED):
    """(mean of a - b, low, high): the mean difference of paired per-digit scores and its 95%
    paired-bootstrap interval (percentiles of ``resamples`` resampled means)."""
    difference = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            difference[rng.integers(0, len(difference), (100, len(difference)))].mean(1)
            for _ in range(math.ceil(resamples / 100))
        ]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return float(difference.mean()), float(low), float(high)


def mcnemar(only_first, only_second):
    """McNemar's exact two-sided p-value: the binomial test of ``only_first`` answers where the
    first model alone is right against ``only_second`` where the second alone is, at one half."""
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    ks = np.arange(k + 1)
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in ks])
        - n * math.log(2)
    )
    top = log_pmf.max()
    tail = math.exp(top) * np.exp(log_pmf - top).sum()
    return min(1.0, 2 * tail)


def paired(first, second):
    """{"difference", "low", "high", "p", "verdict"} of two models' answers, each a (seeds,
    settings, digits) bool array: which digits it gets right at each setting in each seed."""
    difference, low, high = bootstrap(first.mean((0, 1)), second.mean((0, 1)))
    p = mcnemar(int((first & ~second).sum()), int((~first & second).sum()))
    return {
        "difference": difference,
        "low": low,
        "high": high,
        "p": p,
        "verdict": verdict(low, high, p),
    }


def verdict(low, high, p):
    """What the two tests say together: "better", "worse" or "within the noise"."""
    if p < P_VALUE and low > 0:
        return "better"
    if p < P_VALUE and high < 0:
        return "worse"
    return "within the noise"


def cell(result):
    """'+0.12 [-0.05, +0.29], p 0.21' in points."""
    return (
        f"{result['difference'] * 100:+.2f} [{result['low'] * 100:+.2f},"
        f" {result['high'] * 100:+.2f}], p {result['p']:.2g}"
    )


def comparisons(first, second, measure):
    """{seed: paired(...)} for each seed both {seed: job} share, and "pooled" where there are
    several."""
    seeds = sorted(set(first) & set(second))
    arrays = {seed: (right(first[seed], measure), right(second[seed], measure)) for seed in seeds}
    result = {seed: paired(a[None], b[None]) for seed, (a, b) in arrays.items()}
    if len(seeds) > 1:
        result["pooled"] = paired(
            np.stack([a for a, _ in arrays.values()]), np.stack([b for _, b in arrays.values()])
        )
    return result


def report_lines(sweep):
    """report.md's paired comparisons of each pair of models, clean, held out and trained on, per
    seed and pooled."""
    models = jobs_by_model(sweep or {})
    pairs = [(a, b) for a, b in PAIRS if a in models and b in models]
    if not pairs:
        return []
    lines = ["", "## Paired comparisons on the same digits (compare.py)", ""]
    lines += [
        "The first model's accuracy minus the second's, in points, with a 95% paired-bootstrap"
        f" interval over the test digits ({RESAMPLES:,} resamples) and McNemar's exact"
        " p-value on the answers where one is right and the other wrong. *Better* or *worse*:"
        f" the interval excludes 0 and p < {P_VALUE}; else *within the noise*. Pooled: each digit's"
        " score averaged over the seeds, McNemar over every seed's answers.",
        "",
        "| pair | measure | seed | difference [95% interval], McNemar p | verdict |",
        "|---|---|---|---|---|",
    ]
    for a, b in pairs:
        for measure, title in MEASURES.items():
            for seed, result in comparisons(models[a], models[b], measure).items():
                lines.append(
                    f"| {a} − {b} | {title} | {seed} | {cell(result)} | {result['verdict']} |"
                )
    return lines + family_lines(models, *pairs[0])


def family_lines(models, a, b):
    """The first pair's comparison on each family, pooled over the seeds."""
    lines = ["", f"{a} − {b} on each family, over its five strengths, pooled over the seeds:", ""]
    lines += ["| family | | difference [95% interval], McNemar p | verdict |", "|---|---|---|---|"]
    for family in FAMILIES:
        result = comparisons(models[a], models[b], family)
        result = result.get("pooled", next(iter(result.values())))
        lines.append(f"| {family} | {kind(family)} | {cell(result)} | {result['verdict']} |")
    return lines


def halves(job):
    """(error on the first HALF test digits, on the last HALF, on all) of a job swept on the whole
    test set."""
    clean = right(job, "clean")[0]
    return 1 - clean[:HALF].mean(), 1 - clean[HALF:].mean(), 1 - clean.mean()


def halves_lines(sweep):
    """report.md's error of each model on the test set's two halves, per seed; only when the sweep
    scored the whole test set."""
    models = jobs_by_model(sweep or {})
    sizes = {job["right"]["digits"] for jobs in models.values() for job in jobs.values()}
    if sizes != {2 * HALF}:
        return []
    lines = [
        "",
        "## The test set's two halves",
        "",
        "Test error of the final weights on digits 1-5,000 and 5,001-10,000. The MNIST page says"
        " the first half was written by NIST's training-set writers and is the cleaner and easier,"
        " the second by its test-set writers; the errors below are what these models make.",
        "",
        "| model | seed | first 5,000 | last 5,000 | all 10,000 | reference |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, jobs in models.items():
        rows = {seed: halves(job) for seed, job in jobs.items()}
        if len(rows) > 1:
            rows["mean"] = tuple(np.mean(list(rows.values()), 0))
        for seed, errors in rows.items():
            reference = f"LeCun et al. 1998: {LECUN_1998_ERROR:.2%}" if name == "lenet5" else ""
            lines.append(
                f"| {name} | {seed} | "
                + " | ".join(f"{e:.2%}" for e in errors)
                + f" | {reference} |"
            )
    return lines


# ------------------------------------------------------------ two runs


def swept(run_dir, model):
    """(the test set it was swept on, {seed: job}) of ``model`` in a run's robustness.json."""
    path = Path(run_dir) / "robustness.json"
    sweep = runs.read_json(path)
    jobs = jobs_by_model(sweep.get("jobs", {})) if isinstance(sweep, dict) else {}
    if model not in jobs:
        raise RunError(f"{path}: no {model} in it (python plot.py {run_dir} sweeps the run)")
    return sweep.get("test_set"), jobs[model]


def run_lines(first_dir, second_dir, model):
    """``model`` of the first run minus the same model of the second, clean, held out and trained
    on, per seed and pooled: a table's lines."""
    (first_set, first), (second_set, second) = swept(first_dir, model), swept(second_dir, model)
    if first_set != second_set:
        raise RunError(f"{first_dir} and {second_dir}: swept on different test sets, not paired")
    lines = [
        f"{model}: {first_dir} − {second_dir}, in points",
        "",
        "| measure | seed | difference [95% interval], McNemar p | verdict |",
        "|---|---|---|---|",
    ]
    for measure, title in MEASURES.items():
        for seed, result in comparisons(first, second, measure).items():
            lines.append(f"| {title} | {seed} | {cell(result)} | {result['verdict']} |")
    return lines


def main(argv=None):
    p = cli.parser("compare.py", __doc__)
    p.add_argument("runs", nargs=2, type=Path, metavar="RUN", help="two runs swept by plot.py")
    p.add_argument("--model", default="lenet5_reg", help="the model compared (default: lenet5_reg)")
    args = p.parse_args(cli.arguments(argv))
    try:
        print("\n".join(run_lines(*(runs.find_run(run) for run in args.runs), args.model)))
    except RunError as e:
        cli.error(e)
        return 1
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
