"""stages/source_finding.py's catalogue comparison and the image gate's scores from it."""

from __future__ import annotations

from stages.source_finding import FoundSource, apparent_flux_jy, compare
from supervisor.config import GatesConfig
from supervisor.gates import evaluate


def found(ra: float, dec: float, flux: float) -> FoundSource:
    return FoundSource(0, ra, dec, 0.5, 0.5, flux, 0.01, flux, 20.0, 15.0, 0.0, 0.002, "S")


REFERENCE = [
    {"name": "A", "ra_deg": 10.0, "dec_deg": 30.0, "flux_jy_1p4ghz": 0.5, "offset_deg": 0.0},
    {"name": "B", "ra_deg": 10.1, "dec_deg": 30.0, "flux_jy_1p4ghz": 0.2, "offset_deg": 0.5},
    {"name": "C", "ra_deg": 10.2, "dec_deg": 30.1, "flux_jy_1p4ghz": 0.001, "offset_deg": 0.2},
    {"name": "D", "ra_deg": 12.0, "dec_deg": 30.0, "flux_jy_1p4ghz": 0.3, "offset_deg": 1.0},
]


def test_compare_matches_within_the_radius_and_counts_what_was_missed() -> None:
    a = apparent_flux_jy(REFERENCE[0], 1.4e9, 4.65)
    b = apparent_flux_jy(REFERENCE[1], 1.4e9, 4.65)
    sources = [
        found(10.0 + 2.0 / 3600, 30.0, 0.9 * a),  # A, 2" off (RA offset x cos dec ~ 1.7")
        found(10.1, 30.0 + 30.0 / 3600, b),  # B is 30" away: outside a 20" radius
        found(11.0, 30.0, 0.05),  # nothing in the catalogue: unmatched
    ]
    out = compare(
        sources,
        REFERENCE,
        freq_hz=1.4e9,
        dish_m=4.65,
        rms_jy=0.002,  # C (1 mJy) is below 5 sigma: not expected
        match_radius_arcsec=20.0,
        in_field=lambda ra, dec: ra < 11.5,  # D is outside the image
    )
    assert out["catalogue_expected_5sigma"] == 2
    assert (out["catalogue_matched"], out["catalogue_missed"]) == (1, 1)
    assert out["sources_unmatched_5sigma"] == 2
    assert abs(out["catalogue_flux_ratio_median"] - 0.9) < 1e-3
    assert 1.5 < out["astrometry_offset_arcsec_median"] < 2.0


def test_the_image_gate_scores_flux_scale_and_astrometry_once_enough_matched() -> None:
    g = GatesConfig()
    base = {"rms_over_theory": 1.0}
    few = evaluate("image", {**base, "catalogue_matched": 2, "catalogue_flux_ratio_median": 0.1}, g)
    assert few is not None and few.verdict == "pass"  # 2 matches: not scored
    bad_flux = {
        **base,
        "catalogue_matched": 10,
        "catalogue_flux_ratio_median": 0.6,
        "astrometry_offset_arcsec_median": 1.0,
    }
    result = evaluate("image", bad_flux, g)
    assert result is not None and result.verdict == "fail"
    assert "catalogue_flux_error" in result.summary()
    shifted = {
        **bad_flux,
        "catalogue_flux_ratio_median": 1.02,
        "astrometry_offset_arcsec_median": 8.0,
    }
    result = evaluate("image", shifted, g)
    assert result is not None and result.verdict == "warn"
    failed_finder = evaluate("image", {**base, "source_finder_error": "ValueError: x"}, g)
    assert failed_finder is not None and failed_finder.verdict == "warn"
