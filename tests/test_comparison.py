"""The statistics of the comparison table (benchmarks/comparison.py): seeds, paired Wilcoxon, ties.

Expected values are worked out by hand: with n distinct, same-signed paired differences the exact
two-sided Wilcoxon signed-rank p-value is 2 / 2**n.
"""

import importlib.util

import numpy as np
import pytest

from test_training import ROOT

spec = importlib.util.spec_from_file_location("comparison", ROOT / "benchmarks" / "comparison.py")
comparison = importlib.util.module_from_spec(spec)
spec.loader.exec_module(comparison)

CASES = ["a", "b", "c", "d"]
FULL = {0: [0.80, 0.82, 0.84, 0.86], 1: [0.81, 0.83, 0.85, 0.87], 2: [0.79, 0.81, 0.83, 0.85]}  # seed means .83 .84 .82


def _results(rows: dict) -> dict:
    return {"mr2us": {row: {seed: {"per_case": {c: {"dsc": v} for c, v in zip(CASES, values)}}
                            for seed, values in seeds.items()} for row, seeds in rows.items()}}


def test_consistent_gain_beyond_the_seed_spread_is_higher():
    shift = {s: [v + 0.05 + 0.001 * (4 * s + i) for i, v in enumerate(vals)] for s, vals in FULL.items()}
    table = comparison._stats(_results({"full": FULL, "voxelmorph": shift}), "mr2us", "dsc")
    assert table["full"]["mean"] == pytest.approx(0.83)
    assert table["full"]["sd"] == pytest.approx(0.01)  # sample SD of 0.83, 0.84, 0.82
    row = table["voxelmorph"]
    assert row["n_pairs"] == 12 and row["p"] == pytest.approx(2 / 2**12)
    assert row["gap"] == pytest.approx(0.05 + 0.001 * 5.5)
    assert row["verdict"] == "better"


def test_gap_inside_the_seed_spread_is_a_tie_even_when_significant():
    shift = {s: [v - 0.005 - 0.0001 * (4 * s + i) for i, v in enumerate(vals)] for s, vals in FULL.items()}
    row = comparison._stats(_results({"full": FULL, "cmca": shift}), "mr2us", "dsc")["cmca"]
    assert row["p"] < 0.05 and row["gap"] < 0 and row["verdict"] == "tie"


def test_mixed_signs_are_a_tie():
    mixed = {s: [v + (0.05 if i % 2 else -0.05) + 0.001 * (4 * s + i) for i, v in enumerate(vals)]
             for s, vals in FULL.items()}
    row = comparison._stats(_results({"full": FULL, "no_lstm": mixed}), "mr2us", "dsc")["no_lstm"]
    assert row["p"] > 0.05 and row["verdict"] == "tie"


def test_a_deterministic_row_is_paired_with_every_seed():
    ants = {0: [0.60, 0.61, 0.62, 0.63]}
    row = comparison._stats(_results({"full": FULL, "ants_syn": ants}), "mr2us", "dsc")["ants_syn"]
    assert row["n_pairs"] == 12 and row["sd"] == 0.0 and row["seeds"] == [0]
    assert row["gap"] == pytest.approx(np.mean(ants[0]) - 0.83)
    assert row["verdict"] == "worse"


def test_lower_is_better_for_errors():
    ants = {0: [0.60, 0.61, 0.62, 0.63]}  # read as TRE values: lower than the full model's, so better
    row = comparison._stats(_results({"full": FULL, "ants_syn": ants}), "mr2us", "dsc", higher_is_better=False)
    assert row["ants_syn"]["verdict"] == "better"


def test_a_work_folder_refuses_other_settings(tmp_path):
    made = {"data": "phantom, 24 cases", "test_split": "holdout", "grid": [24, 24, 20], "epochs": 6, "seg_epochs": 60}
    comparison._check_work(tmp_path, made)
    comparison._check_work(tmp_path, dict(made))  # the same settings resume
    with pytest.raises(FileExistsError, match="settings.json"):
        comparison._check_work(tmp_path, {**made, "epochs": 100})
