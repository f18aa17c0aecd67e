"""Quality gates: scores in ALMA's colour bands, verdicts, and missing metrics failing."""

from __future__ import annotations

import math

import pytest

from supervisor.config import load_config
from supervisor.gates import (
    evaluate,
    score_higher_is_better,
    score_lower_is_better,
    verdict_of,
)

G = load_config(workspace="/tmp", environ={}).gates


@pytest.mark.parametrize(
    ("value", "verdict"),
    [(0.0, "pass"), (0.05, "pass"), (0.2, "warn"), (0.75, "warn"), (0.76, "fail"), (1.0, "fail")],
)
def test_flagged_fraction_bands(value: float, verdict: str) -> None:
    score = score_lower_is_better(value, G.flagged_fraction_warn, G.flagged_fraction_fail)
    assert 0.0 <= score <= 1.0 and verdict_of(score) == verdict


def test_scores_are_monotonic() -> None:
    xs = [i / 100 for i in range(0, 200)]
    lower = [score_lower_is_better(x, 0.05, 0.75) for x in xs]
    assert all(a >= b for a, b in zip(lower, lower[1:], strict=False))
    higher = [score_higher_is_better(x, 20.0, 5.0) for x in range(0, 40)]
    assert all(a <= b for a, b in zip(higher, higher[1:], strict=False))


def test_image_gate_rms_over_theory_bands() -> None:
    for ratio, verdict in ((1.0, "pass"), (2.7, "pass"), (3.5, "warn"), (5.5, "fail")):
        assert evaluate("image", {"rms_over_theory": ratio}, G).verdict == verdict


def test_calibrator_flux_counts_in_the_image_gate() -> None:
    ok = evaluate("image", {"rms_over_theory": 1.0, "calibrator_flux_ratio": 0.97}, G)
    bad = evaluate("image", {"rms_over_theory": 1.0, "calibrator_flux_ratio": 0.7}, G)
    assert ok.verdict == "pass" and bad.verdict == "fail"
    assert "calibrator_flux_error" in bad.summary()


def test_calibration_solve_gate() -> None:
    good = {
        "mode": "solve",
        "flagged_fraction_after_apply": 0.0,
        "solution_flag_fraction": {"B": 0.0},
        "bandpass_snr_median": 70.0,
        "good_antenna_fraction": 1.0,
        "gain_amp_min": 0.8,
        "gain_amp_max": 1.2,
    }
    assert evaluate("calibrate", good, G).verdict == "pass"
    flagged = {**good, "solution_flag_fraction": {"B": 0.3}}
    assert evaluate("calibrate", flagged, G).verdict == "fail"
    low_snr = {**good, "bandpass_snr_median": 3.0}
    assert evaluate("calibrate", low_snr, G).verdict == "fail"
    weak = {**good, "bandpass_snr_median": 10.0}
    assert evaluate("calibrate", weak, G).verdict == "warn"
    wild = {**good, "gain_amp_max": 40.0}
    assert evaluate("calibrate", wild, G).verdict == "fail"


def test_a_missing_metric_fails_rather_than_passes() -> None:
    result = evaluate("convert", {}, G)
    assert result.verdict == "fail" and "n/a" in result.summary()
    assert score_lower_is_better(math.nan, 0.1, 0.2) == 0.0


def test_ungated_stages() -> None:
    assert evaluate("preflight", {}, G) is None and evaluate("register", {}, G) is None


def test_an_elongated_beam_warns_with_its_numbers_and_never_fails() -> None:
    base = {"rms_over_theory": 1.0}
    assert evaluate("image", {**base, "beam_axis_ratio": 1.4}, G).verdict == "pass"
    colinear = evaluate("image", {**base, "beam_axis_ratio": 209.3}, G)
    assert colinear.verdict == "warn" and not colinear.failed
    assert "beam_axis_ratio" in colinear.summary() and "=209 " in colinear.summary()


def test_qa_mask_dilation_is_exact_and_bounded_for_any_beam() -> None:
    """The co-linear array of issue 10: a 98 360" beam on 53" cells asked for a structuring
    element of ~1850 px radius (MemoryError). The distance transform gives the same disc
    and costs only the image."""
    import numpy as np
    from scipy.ndimage import binary_dilation

    from stages.image import _dilate

    mask = np.zeros((96, 96), bool)
    mask[40, 50] = mask[10, 10] = True
    y, x = np.ogrid[-5:6, -5:6]
    assert (_dilate(mask, 5) == binary_dilation(mask, structure=(x * x + y * y) <= 25)).all()
    big = np.zeros((1024, 1024), bool)
    big[3, 3] = True
    assert _dilate(big, 1850).all()
