"""The statistics behind `make bench`'s headlines (benchmarks/common.py): the
headline is the more conservative of the paired median and the ratio of
medians for the target's direction, and a row is noisy when the middle 80% of
its pair ratios leaves +-10% of their median. Pure arithmetic on made-up
timings, so exact comparisons (up to float rounding of a division) hold on
every CPU."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_ratios_compare_each_other_step_with_both_neighbours(common):
    # (clipft, other) seconds: other / clipft for the pair and for the next clipft step
    assert common.pair_ratios([(1.0, 2.0), (2.0, 3.0), (4.0, 4.0)]) == [2.0, 1.0, 1.5, 0.75, 1.0]
    assert common.pair_ratios([]) == []


def test_quantile_interpolates_between_order_statistics(common):
    xs = [4.0, 1.0, 3.0, 2.0]
    assert common.quantile(xs, 0.0) == 1.0 and common.quantile(xs, 1.0) == 4.0
    assert common.quantile(xs, 0.5) == pytest.approx(2.5, rel=1e-12)
    assert common.quantile(xs, 0.10) == pytest.approx(1.3, rel=1e-12)   # (4 - 1) * 0.1 = 0.3 past the first
    assert math.isnan(common.quantile([], 0.5))


def test_the_headline_is_the_less_favourable_of_the_two(common):
    pairs = [(1.0, 3.0), (1.0, 3.0), (2.0, 2.0), (2.0, 2.0)]
    # ratios 3, 3, 3, 1.5, 1, 1, 1: paired median 1.5; medians clipft 1.5, other 2.5: 1.667
    up = common.paired_stats(pairs, ">= 1.05")
    assert up["paired_median"] == pytest.approx(1.5, rel=1e-12)
    assert up["ratio_of_medians"] == pytest.approx(2.5 / 1.5, rel=1e-12)
    assert up["headline"] == up["paired_median"] and up["headline_from"] == "paired_median"
    down = common.paired_stats(pairs, "<= 0.6")          # for a ceiling the larger is the cautious one
    assert down["headline"] == down["ratio_of_medians"] and down["headline_from"] == "ratio_of_medians"
    info = common.paired_stats(pairs, "info")             # no direction: the paired median
    assert info["headline_from"] == "paired_median"
    assert up["pairs"] == 4 and len(up["ratios"]) == 7


def test_noisy_marks_pairs_that_spread_beyond_ten_percent(common):
    steady = [(1.0, 2.0 * f) for f in (1.0, 1.02, 0.98, 1.01, 0.99, 1.03)]
    assert not common.paired_stats(steady, ">= 1.05")["noisy"]
    wide = [(1.0, 2.0 * f) for f in (1.0, 1.3, 0.7, 1.25, 0.75, 1.0)]
    st = common.paired_stats(wide, ">= 1.05")
    assert st["noisy"]
    assert st["spread"]["p10"] < 0.9 * st["paired_median"] < st["paired_median"] < st["spread"]["p90"]


def test_paired_row_carries_both_figures_and_the_flag(common):
    pairs = [(1.0, 3.0), (1.0, 3.0), (2.0, 2.0), (2.0, 2.0)]
    row = common.paired_row(pairs, ">= 1.05", {"steps": 8}, id="x", name="made up", seconds=0.0)
    assert row.ratio == pytest.approx(1.5, rel=1e-12)
    figs = row.figures
    assert figs["steps"] == 8 and figs["headline"] == "paired_median" and figs["pairs"] == 4
    assert figs["ratio_of_medians"] == pytest.approx(2.5 / 1.5, rel=1e-12)
    assert set(figs["pair_ratios"]) == {"min", "p10", "p25", "p75", "p90", "max"}
    assert row.noisy is True       # ratios 1 .. 3 around a median of 1.5
