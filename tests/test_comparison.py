"""The statistics of the comparison table (benchmarks/comparison.py): seeds, paired Wilcoxon, ties.

Expected values are worked out by hand: with n distinct, same-signed paired differences the exact
two-sided Wilcoxon signed-rank p-value is 2 / 2**n.
"""

import importlib.util

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("comparison", ROOT / "benchmarks" / "comparison.py")
comparison = importlib.util.module_from_spec(spec)
spec.loader.exec_module(comparison)

CASES = [f"case{i}" for i in range(8)]
BASE = [0.80 + 0.01 * i for i in range(8)]
FULL = {
    seed: [v + offset for v in BASE] for seed, offset in ((0, 0.0), (1, 0.01), (2, -0.01))
}  # seed means .835 .845 .825


def _results(rows: dict) -> dict:
    return {
        "mr2us": {
            row: {seed: {"per_case": {c: {"dsc": v} for c, v in zip(CASES, values)}} for seed, values in seeds.items()}
            for row, seeds in rows.items()
        }
    }


def _shifted(shift) -> dict:
    """The full model's values plus ``shift(case index)``, every seed."""
    return {s: [v + shift(i) for i, v in enumerate(vals)] for s, vals in FULL.items()}


def test_consistent_gain_beyond_the_seed_spread_is_better():
    table = comparison._stats(
        _results({"full": FULL, "voxelmorph": _shifted(lambda i: 0.05 + 0.001 * i)}), "mr2us", "dsc"
    )
    assert table["full"]["mean"] == pytest.approx(0.835)
    assert table["full"]["sd"] == pytest.approx(0.01)  # sample SD of 0.835, 0.845, 0.825
    row = table["voxelmorph"]
    # 8 cases (seed-averaged), 8 distinct positive differences: exact two-sided p = 2 / 2**8
    assert row["n_cases"] == 8 and row["p"] == pytest.approx(2 / 2**8)
    assert row["gap"] == pytest.approx(0.05 + 0.001 * 3.5)
    assert row["verdict"] == "better"


def test_gap_inside_the_seed_spread_is_a_tie_even_when_significant():
    row = comparison._stats(_results({"full": FULL, "cmca": _shifted(lambda i: -0.005 - 0.0001 * i)}), "mr2us", "dsc")[
        "cmca"
    ]
    assert row["p"] == pytest.approx(2 / 2**8) and row["gap"] < 0 and row["verdict"] == "tie"


def test_mixed_signs_are_a_tie():
    mixed = _shifted(lambda i: (0.05 if i % 2 else -0.05) + 0.001 * i)
    row = comparison._stats(_results({"full": FULL, "no_lstm": mixed}), "mr2us", "dsc")["no_lstm"]
    assert row["p"] > 0.05 and row["verdict"] == "tie"


def test_a_deterministic_row_is_compared_with_the_seed_mean():
    ants = {0: [0.60 + 0.01 * i for i in range(8)]}
    row = comparison._stats(_results({"full": FULL, "ants_syn": ants}), "mr2us", "dsc")["ants_syn"]
    assert row["n_cases"] == 8 and row["sd"] == 0.0 and row["seeds"] == [0]
    assert row["gap"] == pytest.approx(0.635 - 0.835)
    assert row["verdict"] == "worse"


def test_a_learned_row_with_one_seed_is_compared_on_that_seed_only():
    # cmca ran with seed 1 only (the others failed) and equals the full model's seed 1 exactly
    row = comparison._stats(_results({"full": FULL, "cmca": {1: FULL[1]}}), "mr2us", "dsc")["cmca"]
    assert row["n_cases"] == 8 and row["gap"] == pytest.approx(0.0) and row["p"] == 1.0


def test_lower_is_better_for_errors():
    ants = {0: [0.60 + 0.01 * i for i in range(8)]}  # read as TRE values: lower than the full model's, so better
    row = comparison._stats(_results({"full": FULL, "ants_syn": ants}), "mr2us", "dsc", higher_is_better=False)
    assert row["ants_syn"]["verdict"] == "better"


def test_without_the_reference_no_row_gets_a_verdict():
    table = comparison._stats(_results({"ants_syn": {0: BASE}}), "mr2us", "dsc")
    assert "p" not in table["ants_syn"] and "verdict" not in table["ants_syn"]


def test_a_work_folder_refuses_other_settings(tmp_path):
    made = {"data": "phantom, 24 cases", "test_split": "holdout", "grid": [24, 24, 20], "epochs": 6, "seg_epochs": 60}
    comparison._check_work(tmp_path, made)
    comparison._check_work(tmp_path, dict(made))  # the same settings resume
    with pytest.raises(FileExistsError, match="settings.json"):
        comparison._check_work(tmp_path, {**made, "epochs": 100})
