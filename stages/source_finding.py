"""A source catalogue per image (PyBDSF) and its comparison with the sky catalogue: flux
scale, astrometry, and which sources above 5 sigma were found or missed.

PyBDSF (``bdsf``, the LOFAR/ASKAP source finder) fits Gaussians to islands of emission
with a local rms map; it is what radio surveys use and it is on PyPI. Fluxes in Jy at the
image's reference frequency; positions J2000 degrees; the reference sources are the sky
catalogue's, as the primary beam attenuates them (the flat-noise image is not corrected).
"""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import apparent_spectrum

COLUMNS = (
    "source_id",
    "ra_deg",
    "dec_deg",
    "e_ra_arcsec",
    "e_dec_arcsec",
    "total_flux_jy",
    "e_total_flux_jy",
    "peak_flux_jy",
    "maj_arcsec",
    "min_arcsec",
    "pa_deg",
    "island_rms_jy",
    "s_code",
)


@dataclass(frozen=True)
class FoundSource:
    """One PyBDSF source (its ``srl`` row): position, fluxes, fitted size, local rms."""

    source_id: int
    ra_deg: float
    dec_deg: float
    e_ra_arcsec: float
    e_dec_arcsec: float
    total_flux_jy: float
    e_total_flux_jy: float
    peak_flux_jy: float
    maj_arcsec: float
    min_arcsec: float
    pa_deg: float
    island_rms_jy: float
    s_code: str  # S single Gaussian, M multiple, C in an island with others


def find_sources(
    fits: Path, workdir: Path, thresh_pix: float, thresh_isl: float
) -> list[FoundSource]:
    """Run PyBDSF on ``fits``: islands above ``thresh_isl`` sigma holding a pixel above
    ``thresh_pix`` sigma (local rms), one Gaussian or more per island."""
    import bdsf

    workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = bdsf.process_image(
            str(fits),
            thresh_pix=thresh_pix,
            thresh_isl=thresh_isl,
            adaptive_rms_box=True,
            quiet=True,
            ncores=1,
            output_opts=False,
        )
    out = []
    for src in getattr(img, "sources", []):
        ra, dec = src.posn_sky_centroid
        e_ra, e_dec = src.posn_sky_centroidE
        maj, mn, pa = src.size_sky
        out.append(
            FoundSource(
                source_id=int(src.source_id),
                ra_deg=float(ra),
                dec_deg=float(dec),
                e_ra_arcsec=float(e_ra) * 3600.0,
                e_dec_arcsec=float(e_dec) * 3600.0,
                total_flux_jy=float(src.total_flux),
                e_total_flux_jy=float(src.total_fluxE),
                peak_flux_jy=float(src.peak_flux_max),
                maj_arcsec=float(maj) * 3600.0,
                min_arcsec=float(mn) * 3600.0,
                pa_deg=float(pa),
                island_rms_jy=float(src.rms_isl),
                s_code=str(src.code),
            )
        )
    return out


def write_catalogue(path: Path, sources: list[FoundSource], header: dict[str, Any]) -> None:
    """A CSV with ``# key: value`` header lines (image, finder, reference frequency)."""
    with path.open("w", newline="") as fh:
        for key, value in header.items():
            fh.write(f"# {key}: {value}\n")
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for s in sources:
            writer.writerow([getattr(s, c) for c in COLUMNS])


def apparent_flux_jy(ref: dict[str, Any], freq_hz: float, dish_m: float) -> float:
    """A catalogue source's flux as the array sees it at ``freq_hz`` (stages.common's
    apparent_spectrum at one frequency; spectral index -0.7 where the catalogue has none)."""
    src = {**ref, "spectral_index": ref.get("spectral_index", -0.7)}
    return float(apparent_spectrum(src, np.array([freq_hz]), dish_m)[0])


def compare(
    found: list[FoundSource],
    reference: list[dict[str, Any]],
    *,
    freq_hz: float,
    dish_m: float,
    rms_jy: float,
    match_radius_arcsec: float,
    in_field: Any,
) -> dict[str, Any]:
    """Match ``found`` with the ``reference`` sources that ``in_field(ra, dec)`` and whose
    apparent flux is above 5 ``rms_jy``: nearest within ``match_radius_arcsec``. Returns
    counts (matched, missed, unmatched found above 5 sigma), flux ratio found/apparent
    (median and robust scatter: 1.4826 x MAD) and the median position offset."""
    expected = []
    for ref in reference:
        if not in_field(float(ref["ra_deg"]), float(ref["dec_deg"])):
            continue
        flux = apparent_flux_jy(ref, freq_hz, dish_m)
        if flux >= 5.0 * rms_jy:
            expected.append((ref, flux))
    bright = [s for s in found if s.peak_flux_jy >= 5.0 * rms_jy]
    used: set[int] = set()
    ratios, offsets = [], []
    missed = 0
    for ref, flux in expected:
        best, best_sep = None, match_radius_arcsec
        for i, s in enumerate(bright):
            if i in used:
                continue
            sep = _separation_arcsec(
                s.ra_deg, s.dec_deg, float(ref["ra_deg"]), float(ref["dec_deg"])
            )
            if sep <= best_sep:
                best, best_sep = i, sep
        if best is None:
            missed += 1
            continue
        used.add(best)
        ratios.append(bright[best].total_flux_jy / flux)
        offsets.append(best_sep)
    out: dict[str, Any] = {
        "catalogue_expected_5sigma": len(expected),
        "catalogue_matched": len(ratios),
        "catalogue_missed": missed,
        "sources_found": len(found),
        "sources_found_5sigma": len(bright),
        "sources_unmatched_5sigma": len(bright) - len(used),
    }
    if ratios:
        median = statistics.median(ratios)
        mad = statistics.median(abs(r - median) for r in ratios)
        out.update(
            catalogue_flux_ratio_median=round(median, 4),
            catalogue_flux_ratio_scatter=round(1.4826 * mad, 4),
            astrometry_offset_arcsec_median=round(statistics.median(offsets), 3),
        )
    return out


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = (math.radians(x) for x in (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(float(np.clip(c, -1.0, 1.0)))) * 3600.0
