"""Mandatory quality gates: turn a stage's metrics into 0..1 scores (ALMA colour bands) and a
verdict. A failed gate is never passed silently; the policy decides what it means."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from supervisor.config import GatesConfig

PASS_ABOVE = 0.66
FAIL_AT_OR_BELOW = 0.33


@dataclass(frozen=True)
class MetricScore:
    name: str
    value: float | None
    score: float
    verdict: str
    rule: str


@dataclass(frozen=True)
class GateResult:
    stage: str
    score: float
    verdict: str  # pass / warn / fail
    scores: list[MetricScore] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    def summary(self) -> str:
        bad = [s for s in self.scores if s.verdict != "pass"]
        parts = [f"{s.name}={_fmt(s.value)} ({s.verdict}: {s.rule})" for s in bad]
        return f"{self.stage} gate {self.verdict} (score {self.score:.2f})" + (
            ": " + "; ".join(parts) if parts else ""
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "score": self.score,
            "verdict": self.verdict,
            "metrics": {
                s.name: {"value": s.value, "score": s.score, "verdict": s.verdict, "rule": s.rule}
                for s in self.scores
            },
        }


def verdict_of(score: float) -> str:
    if score > PASS_ABOVE:
        return "pass"
    return "warn" if score > FAIL_AT_OR_BELOW else "fail"


def score_lower_is_better(value: float, warn: float, fail: float) -> float:
    """1 at 0, 0.67 at ``warn``, 0.34 at ``fail``, falling to 0 at twice ``fail``."""
    if value is None or not math.isfinite(value):
        return 0.0
    if value <= warn:
        return 1.0 - 0.33 * (value / warn if warn > 0 else 0.0)
    if value <= fail:
        return 0.66 - 0.32 * (value - warn) / (fail - warn)
    return max(0.0, 0.33 * (1.0 - (value - fail) / fail)) if fail > 0 else 0.0


def score_higher_is_better(value: float, target: float, minimum: float) -> float:
    """1 at or above ``target``, 0.67..1 between, 0.34..0.66 between ``minimum`` and the
    target's lower band, <= 0.33 below ``minimum``."""
    if value is None or not math.isfinite(value):
        return 0.0
    if value >= target:
        return 1.0
    if value >= minimum:
        return 0.34 + 0.65 * (value - minimum) / (target - minimum) if target > minimum else 1.0
    return max(0.0, 0.33 * value / minimum) if minimum > 0 else 0.0


def _score(name: str, value: Any, score: float, rule: str) -> MetricScore:
    val = None if value is None else float(value)
    return MetricScore(name, val, round(score, 3), verdict_of(score), rule)


def _combine(stage: str, scores: list[MetricScore]) -> GateResult:
    overall = min((s.score for s in scores), default=1.0)
    return GateResult(stage, round(overall, 3), verdict_of(overall), scores)


def evaluate(stage: str, metrics: dict[str, Any], g: GatesConfig) -> GateResult | None:
    """The gate of ``stage`` over its result metrics, or None for ungated stages."""
    if stage == "convert":
        f = metrics.get("flagged_fraction")
        scores = [
            _score(
                "flagged_fraction",
                f,
                score_lower_is_better(_num(f), g.flagged_fraction_warn, g.flagged_fraction_fail),
                f"<= {g.flagged_fraction_warn} ideal, > {g.flagged_fraction_fail} fails",
            )
        ]
        rfi = metrics.get("rfi_flagged_fraction")
        if rfi is not None:  # an MS converted before flagging existed has none
            scores.append(
                _score(
                    "rfi_flagged_fraction",
                    rfi,
                    score_lower_is_better(
                        _num(rfi), g.rfi_flagged_fraction_warn, g.rfi_flagged_fraction_fail
                    ),
                    f"<= {g.rfi_flagged_fraction_warn} pass, > {g.rfi_flagged_fraction_fail} fails",
                )
            )
        n_ant = metrics.get("n_antennas")
        if metrics.get("antennas_flagged") is not None and n_ant:
            broken = len(metrics["antennas_flagged"]) / float(n_ant)
            scores.append(
                _score(
                    "broken_antenna_fraction",
                    broken,
                    score_lower_is_better(
                        broken, g.broken_antenna_fraction_warn, g.broken_antenna_fraction_fail
                    ),
                    f"dead or noisy antennas <= {g.broken_antenna_fraction_warn} pass, > "
                    f"{g.broken_antenna_fraction_fail} fails",
                )
            )
        return _combine(stage, scores)
    if stage == "calibrate":
        scores = []
        after = metrics.get("flagged_fraction_after_apply")
        scores.append(
            _score(
                "flagged_fraction_after_apply",
                after,
                score_lower_is_better(
                    _num(after), g.flagged_fraction_warn, g.flagged_fraction_fail
                ),
                f"> {g.flagged_fraction_fail} fails",
            )
        )
        if metrics.get("mode") == "solve":
            bflag = (metrics.get("solution_flag_fraction") or {}).get("B")
            scores.append(
                _score(
                    "bandpass_flag_fraction",
                    bflag,
                    score_lower_is_better(
                        _num(bflag), g.solution_flag_fraction_warn, g.solution_flag_fraction_fail
                    ),
                    f"> {g.solution_flag_fraction_fail} of solutions flagged fails",
                )
            )
            snr = metrics.get("bandpass_snr_median")
            scores.append(
                _score(
                    "bandpass_snr_median",
                    snr,
                    score_higher_is_better(_num(snr), g.bandpass_snr_target, g.bandpass_snr_min),
                    f">= {g.bandpass_snr_target} target, < {g.bandpass_snr_min} fails",
                )
            )
            good = metrics.get("good_antenna_fraction")
            scores.append(
                _score(
                    "good_antenna_fraction",
                    good,
                    1.0 if _num(good) >= g.good_antenna_fraction_min else 0.0,
                    f">= {g.good_antenna_fraction_min} required",
                )
            )
            lo, hi = _num(metrics.get("gain_amp_min")), _num(metrics.get("gain_amp_max"))
            in_range = g.gain_amp_min <= lo and hi <= g.gain_amp_max
            scores.append(
                _score(
                    "gain_amp_range",
                    hi,
                    1.0 if in_range else 0.0,
                    f"gain amplitudes within {g.gain_amp_min}..{g.gain_amp_max}",
                )
            )
        return _combine(stage, scores)
    if stage == "image":
        ratio = metrics.get("rms_over_theory")
        scores = [
            _score(
                "rms_over_theory",
                ratio,
                score_lower_is_better(_num(ratio), g.rms_over_theory_warn, g.rms_over_theory_fail),
                f"<= {g.rms_over_theory_warn} pass, > {g.rms_over_theory_fail} fails",
            )
        ]
        ratio_ab = metrics.get("beam_axis_ratio")
        if ratio_ab is not None:
            # An elongated beam (the N-S arm flagged or down) is a quality problem to see,
            # not a reason to throw the image away: warn, never fail.
            scores.append(
                _score(
                    "beam_axis_ratio",
                    ratio_ab,
                    1.0 if _num(ratio_ab) <= g.beam_axis_ratio_warn else 0.5,
                    f"<= {g.beam_axis_ratio_warn} pass, above warns (never fails)",
                )
            )
        if metrics.get("calibrator_flux_ratio") is not None:
            err = abs(_num(metrics["calibrator_flux_ratio"]) - 1.0)
            scores.append(
                _score(
                    "calibrator_flux_error",
                    err,
                    score_lower_is_better(
                        err, g.calibrator_flux_error_warn, g.calibrator_flux_error_fail
                    ),
                    f"|ratio - 1| <= {g.calibrator_flux_error_warn} pass, > "
                    f"{g.calibrator_flux_error_fail} fails",
                )
            )
        scores += _catalogue_scores(metrics, g)
        return _combine(stage, scores)
    return None


def _catalogue_scores(metrics: dict[str, Any], g: GatesConfig) -> list[MetricScore]:
    """The image's PyBDSF catalogue against the sky catalogue: flux scale and astrometry,
    scored once enough sources matched; a source finder that failed warns (never fails:
    the image itself stands)."""
    if metrics.get("source_finder_error"):
        return [
            _score(
                "source_finder", None, 0.5, "PyBDSF failed: " + metrics["source_finder_error"][:80]
            )
        ]
    matched = metrics.get("catalogue_matched")
    if matched is None or matched < g.catalogue_min_matched:
        return []
    err = abs(_num(metrics.get("catalogue_flux_ratio_median")) - 1.0)
    offset = _num(metrics.get("astrometry_offset_arcsec_median"))
    return [
        _score(
            "catalogue_flux_error",
            err,
            score_lower_is_better(err, g.catalogue_flux_error_warn, g.catalogue_flux_error_fail),
            f"|median found/catalogue - 1| <= {g.catalogue_flux_error_warn} pass, > "
            f"{g.catalogue_flux_error_fail} fails ({matched} sources)",
        ),
        _score(
            "astrometry_offset_arcsec",
            offset,
            score_lower_is_better(
                offset, g.astrometry_offset_warn_arcsec, g.astrometry_offset_fail_arcsec
            ),
            f'median offset <= {g.astrometry_offset_warn_arcsec}" pass, > '
            f'{g.astrometry_offset_fail_arcsec}" fails',
        ),
    ]


def on_fail_category(stage: str, g: GatesConfig) -> str:
    return {
        "convert": g.convert_on_fail,
        "calibrate": g.calibrate_on_fail,
        "image": g.image_on_fail,
    }.get(stage, "validation")


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
