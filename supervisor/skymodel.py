"""The field sky model: a survey catalogue (NVSS-like, CSV) read strictly, and the part of
it a calibrator group's model should hold so that the gains do not absorb the field.

Format: ``#`` comment lines, then a header naming the columns, then one source per line.
Required: ``ra_deg``, ``dec_deg`` (J2000) and ``flux_mjy`` (integrated flux density at
1.4 GHz, NVSS's unit). Optional: ``name``, ``spectral_index`` (S ~ nu^alpha; default
-0.7), ``major_arcsec``, ``minor_arcsec``, ``pa_deg`` (deconvolved Gaussian size; absent
or 0: a point source). Anything else is an error that names the file, line and column.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.calibrators import angular_separation_deg, primary_beam_gain

REQUIRED = ("ra_deg", "dec_deg", "flux_mjy")
OPTIONAL = ("name", "spectral_index", "major_arcsec", "minor_arcsec", "pa_deg")
DEFAULT_SPECTRAL_INDEX = -0.7


class CatalogueError(ValueError):
    """A malformed sky catalogue; ``problems`` lists every one found, each with its line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class CatalogueSource:
    """One catalogue entry: J2000 position (deg), flux density at 1.4 GHz (Jy), spectral
    index, deconvolved Gaussian size (arcsec, 0: unresolved) and position angle (deg)."""

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy_1p4ghz: float
    spectral_index: float
    major_arcsec: float = 0.0
    minor_arcsec: float = 0.0
    pa_deg: float = 0.0


def read_catalogue(path: Path) -> tuple[CatalogueSource, ...]:
    """Every source of the catalogue at ``path``; raises :class:`CatalogueError`."""
    stat = path.stat()
    return _read_cached(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_cached(path: Path, _mtime_ns: int, _size: int) -> tuple[CatalogueSource, ...]:
    problems: list[str] = []
    sources: list[CatalogueSource] = []
    with path.open(newline="") as fh:
        lines = [(n, line) for n, line in enumerate(fh, start=1) if not line.startswith("#")]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise CatalogueError([f"{path}: no header line (and no sources)"])
    header_no, header_line = lines[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    missing = [h for h in REQUIRED if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        what = []
        if unknown:
            what.append(f"unknown columns {unknown}")
        if missing:
            what.append(f"missing columns {missing}")
        if len(set(header)) != len(header):
            what.append("a column is named twice")
        raise CatalogueError(
            [
                f"{path}:{header_no}: header {header}: {'; '.join(what)} (columns: "
                f"{', '.join(REQUIRED)} required; {', '.join(OPTIONAL)} optional)"
            ]
        )
    for number, line in lines[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(header):
            problems.append(f"{path}:{number}: {len(cells)} fields, the header has {len(header)}")
            continue
        row = dict(zip(header, cells, strict=True))
        parsed = _parse_row(row, f"{path}:{number}", problems)
        if parsed is not None:
            sources.append(parsed)
        if len(problems) >= 50:
            problems.append(f"{path}: stopped after 50 problems")
            break
    if problems:
        raise CatalogueError(problems)
    return tuple(sources)


def _parse_row(row: dict[str, str], where: str, problems: list[str]) -> CatalogueSource | None:
    values: dict[str, float] = {}
    bad = False
    limits = {
        "ra_deg": (0.0, 360.0),
        "dec_deg": (-90.0, 90.0),
        "flux_mjy": (0.0, 1e7),
        "spectral_index": (-5.0, 5.0),
        "major_arcsec": (0.0, 3600.0),
        "minor_arcsec": (0.0, 3600.0),
        "pa_deg": (-360.0, 360.0),
    }
    for column, (lo, hi) in limits.items():
        text = row.get(column, "")
        if text == "" and column not in REQUIRED:
            continue
        try:
            value = float(text)
        except ValueError:
            problems.append(f"{where}: {column} = {text!r}: not a number")
            bad = True
            continue
        if not math.isfinite(value) or not lo <= value <= hi:
            problems.append(f"{where}: {column} = {text}: must be finite, within {lo:g}..{hi:g}")
            bad = True
            continue
        values[column] = value
    if bad:
        return None
    if values["flux_mjy"] <= 0:
        problems.append(f"{where}: flux_mjy = {row['flux_mjy']}: must be positive")
        return None
    major, minor = values.get("major_arcsec", 0.0), values.get("minor_arcsec", 0.0)
    if minor > major:
        problems.append(f"{where}: minor_arcsec {minor:g} > major_arcsec {major:g}")
        return None
    return CatalogueSource(
        name=row.get("name") or f"J{values['ra_deg']:.4f}{values['dec_deg']:+.4f}",
        ra_deg=values["ra_deg"],
        dec_deg=values["dec_deg"],
        flux_jy_1p4ghz=values["flux_mjy"] / 1000.0,
        spectral_index=values.get("spectral_index", DEFAULT_SPECTRAL_INDEX),
        major_arcsec=major,
        minor_arcsec=minor,
        pa_deg=values.get("pa_deg", 0.0),
    )


def field_model(
    catalogue: tuple[CatalogueSource, ...],
    centre_ra_deg: float,
    centre_dec_deg: float,
    *,
    dish_m: float,
    min_beam_gain: float,
    min_apparent_jy: float,
    max_sources: int,
    exclude: tuple[tuple[float, float], ...] = (),
    exclude_radius_arcsec: float = 60.0,
) -> list[dict[str, Any]]:
    """The catalogue sources a calibration model should hold for a field centred at
    (``centre_ra_deg``, ``centre_dec_deg``): where the 1.4 GHz beam gain is at least
    ``min_beam_gain`` and the apparent flux at least ``min_apparent_jy``, brightest
    first, at most ``max_sources``; sources within ``exclude_radius_arcsec`` of an
    ``exclude`` position (the calibrator, modelled from its own catalogue) left out.
    Entries have the calibration model's keys (offset_deg, pb_gain_1p4ghz, ...)."""
    out = []
    cos_dec = math.cos(math.radians(centre_dec_deg))
    for src in catalogue:
        if abs(src.dec_deg - centre_dec_deg) > 10.0:
            continue  # far outside any beam: skip the trigonometry
        dra = abs((src.ra_deg - centre_ra_deg + 180.0) % 360.0 - 180.0) * cos_dec
        if dra > 10.0:
            continue
        offset = angular_separation_deg(src.ra_deg, src.dec_deg, centre_ra_deg, centre_dec_deg)
        gain = primary_beam_gain(offset, 1.4e9, dish_m)
        apparent = src.flux_jy_1p4ghz * gain
        if gain < min_beam_gain or apparent < min_apparent_jy:
            continue
        if any(
            angular_separation_deg(src.ra_deg, src.dec_deg, ra, dec) * 3600.0
            < exclude_radius_arcsec
            for ra, dec in exclude
        ):
            continue
        out.append(
            {
                "name": src.name,
                "ra_deg": src.ra_deg,
                "dec_deg": src.dec_deg,
                "flux_jy_1p4ghz": src.flux_jy_1p4ghz,
                "apparent_flux_jy_1p4ghz": apparent,
                "spectral_index": src.spectral_index,
                "offset_deg": offset,
                "pb_gain_1p4ghz": gain,
                "major_arcsec": src.major_arcsec,
                "minor_arcsec": src.minor_arcsec,
                "pa_deg": src.pa_deg,
                "origin": "sky_catalogue",
            }
        )
    out.sort(key=lambda s: -s["apparent_flux_jy_1p4ghz"])
    return out[:max_sources]
