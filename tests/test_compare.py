"""compare.py: the paired bootstrap and McNemar's test give the known answers on constructed
pairs, and the test set's two halves add up to the whole."""

import numpy as np
import pytest
import torch

import compare
import files
import robustness


def answers(right, digits=1000):
    """A (seeds, settings, digits) bool array: the first ``right`` digits right, the rest wrong."""
    hits = np.zeros((1, 1, digits), bool)
    hits[..., :right] = True
    return hits


def test_identical_answers_differ_by_nothing_and_mcnemar_gives_p_1():
    rng = np.random.default_rng(0)
    same = rng.random((1, 35, 1000)) < 0.9
    result = compare.paired(same, same.copy())
    assert (result["difference"], result["low"], result["high"]) == (0, 0, 0)
    assert result["p"] == 1 and result["verdict"] == "within the noise"


def test_a_model_right_on_100_more_of_1000_digits_is_better_and_the_other_worse():
    first, second = answers(900), answers(800)
    result = compare.paired(first, second)
    assert result["difference"] == pytest.approx(0.1)
    assert 0 < result["low"] < 0.1 < result["high"]
    # 100 digits where only the first is right, none the other way: p = 2 / 2**100
    assert result["p"] == pytest.approx(2 * 0.5**100) and result["verdict"] == "better"
    assert compare.paired(second, first)["verdict"] == "worse"


def test_mcnemar_is_the_exact_two_sided_binomial_test():
    # 10 discordant answers, 2 one way: P(X <= 2) for X ~ Bin(10, 1/2) is 56 / 1024, doubled
    assert compare.mcnemar(8, 2) == pytest.approx(2 * 56 / 1024)
    assert compare.mcnemar(2, 8) == compare.mcnemar(8, 2)
    assert compare.mcnemar(5, 5) == 1 and compare.mcnemar(0, 0) == 1
    # large counts, no overflow: 5,100 against 4,900 is about 1.6 standard deviations
    assert 0.04 < compare.mcnemar(5100, 4900) < 0.06


def test_three_more_digits_of_1000_are_within_the_noise():
    result = compare.paired(answers(903), answers(900))
    # 3 answers where only the first is right: p = 2 / 2**3
    assert result["p"] == pytest.approx(0.25) and result["low"] <= 0 < result["high"]
    assert result["verdict"] == "within the noise"


def test_the_bootstrap_is_seeded_and_its_interval_narrows_with_more_digits():
    rng = np.random.default_rng(1)
    a, b = rng.random(1000) < 0.95, rng.random(1000) < 0.9
    assert compare.bootstrap(a, b) == compare.bootstrap(a, b)
    wide = compare.bootstrap(a[:250], b[:250])
    narrow = compare.bootstrap(a, b)
    assert narrow[2] - narrow[1] < wide[2] - wide[1]


def job(model, seed, clean):
    """A robustness.json job whose answers are ``clean`` (digits,) bools, on the clean set and at
    every setting of every family."""
    digits = len(clean)
    bits = robustness.packed(torch.from_numpy(clean))
    families = {
        family: [bits] * (len(f.strengths) - 1) for family, f in robustness.FAMILIES.items()
    }
    right = {"digits": digits, "clean": bits, "families": families}
    return {"model": model, "seed": seed, "right": right}


def test_the_halves_of_the_test_set_add_up_to_the_whole():
    rng = np.random.default_rng(2)
    first = rng.random(10_000) < np.r_[np.full(5000, 0.995), np.full(5000, 0.985)]
    easy, hard, whole = compare.halves(job("lenet5", 0, first))
    assert (easy + hard) / 2 == pytest.approx(whole)
    assert easy == pytest.approx(1 - first[:5000].mean()) and hard > easy


def test_report_md_compares_each_pair_per_seed_and_pooled_and_gives_the_halves():
    rng = np.random.default_rng(3)
    sweep = {}
    for seed in (0, 1):
        for model, share in (("lenet5", 0.99), ("lenet5_reg", 0.995), ("mlp", 0.98)):
            sweep[f"{model}/seed{seed}"] = job(model, seed, rng.random(10_000) < share)
    lines = compare.report_lines(sweep)
    rows = [line for line in lines if line.startswith("| lenet5")]
    # three pairs, three measures (clean, held out, trained on), two seeds and pooled
    assert len(rows) == 3 * 3 * 3
    assert any(row.startswith("| lenet5_reg − mlp | clean test set | pooled | +") for row in rows)
    halves = compare.halves_lines(sweep)
    assert sum(line.startswith("| lenet5 | ") for line in halves) == 3  # two seeds and the mean
    assert "LeCun et al. 1998: 0.95%" in "\n".join(halves)
    # a sweep of part of the test set has no halves
    assert compare.halves_lines({"a": job("mlp", 0, np.ones(300, bool))}) == []


def test_one_model_of_two_runs_is_paired_from_the_command_line_and_a_run_not_swept_is_one_line(
    tmp_path, capsys
):
    rng = np.random.default_rng(4)
    test_set = {"path": "test.tar", "size": 10_000}
    for name, share in (("recipe", 0.99), ("variant", 0.95)):
        jobs = {
            f"lenet5_reg/seed{seed}": job("lenet5_reg", seed, rng.random(10_000) < share)
            for seed in (0, 1)
        }
        (tmp_path / name).mkdir()
        files.write_json(tmp_path / name / "robustness.json", {"test_set": test_set, "jobs": jobs})
    assert compare.main([str(tmp_path / "variant"), str(tmp_path / "recipe")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 * 3  # the header; three measures, two seeds and pooled
    pooled = next(row for row in rows if row.startswith("| held-out families | pooled | -"))
    assert pooled.endswith("| worse |")
    (tmp_path / "bare").mkdir()
    assert compare.main([str(tmp_path / "bare"), str(tmp_path / "recipe")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "robustness.json: missing" in err
