"""The calibrator catalogue, sidereal time, and "does a calibrator transit in this group?".

Sidereal time uses the IAU 1982 GMST polynomial (good to ~0.1 s, ample for a 1.5 deg
transit window) so that the daemon needs no astropy at ingest time.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from supervisor.config import DEFAULT_CATALOGUE_PATH

_J2000 = datetime(2000, 1, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Calibrator:
    """A catalogue calibrator: J2000 position (deg) and flux density S = S0 (nu/1.4 GHz)^alpha."""

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy_1p4ghz: float
    spectral_index: float

    def flux_jy(self, freq_hz: float) -> float:
        return self.flux_jy_1p4ghz * (freq_hz / 1.4e9) ** self.spectral_index


def load_catalogue(path: Path | None = None) -> list[Calibrator]:
    """Read the calibrator TOML (``[[calibrator]]`` tables); raises ValueError naming the file."""
    path = path or DEFAULT_CATALOGUE_PATH
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    out = []
    for i, entry in enumerate(data.get("calibrator", [])):
        try:
            out.append(
                Calibrator(
                    name=str(entry["name"]),
                    ra_deg=float(entry["ra_deg"]),
                    dec_deg=float(entry["dec_deg"]),
                    flux_jy_1p4ghz=float(entry["flux_jy_1p4ghz"]),
                    spectral_index=float(entry.get("spectral_index", -0.7)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: calibrator entry {i}: {exc!r}") from None
    return out


def gmst_deg(when: datetime) -> float:
    """Greenwich mean sidereal time (deg) at UTC ``when`` (IAU 1982; UT1 ~ UTC)."""
    d = (when - _J2000).total_seconds() / 86400.0
    t = d / 36525.0
    gmst = 280.46061837 + 360.98564736629 * d + 0.000387933 * t * t - t**3 / 38710000.0
    return gmst % 360.0


def lst_deg(when: datetime, longitude_deg: float) -> float:
    """Local mean sidereal time (deg) at east longitude ``longitude_deg``."""
    return (gmst_deg(when) + longitude_deg) % 360.0


def transiting_calibrator(
    catalogue: list[Calibrator],
    *,
    start: datetime,
    duration_s: float,
    pointing_dec_deg: float,
    longitude_deg: float,
    max_dec_offset_deg: float,
) -> Calibrator | None:
    """The brightest catalogue calibrator that crosses the meridian during the group, near the
    pointing declination (within ``max_dec_offset_deg``), or None."""
    lst0 = lst_deg(start, longitude_deg)
    span = duration_s * 360.98564736629 / 86400.0  # LST degrees covered by the group
    best = None
    for cal in catalogue:
        if abs(cal.dec_deg - pointing_dec_deg) > max_dec_offset_deg:
            continue
        if (cal.ra_deg - lst0) % 360.0 <= span and (
            best is None or cal.flux_jy_1p4ghz > best.flux_jy_1p4ghz
        ):
            best = cal
    return best


def hour_angle_deg(cal: Calibrator, when: datetime, longitude_deg: float) -> float:
    """Hour angle (deg, -180..180) of ``cal`` at ``when``; 0 on the meridian."""
    return ((lst_deg(when, longitude_deg) - cal.ra_deg + 180.0) % 360.0) - 180.0


def angular_separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
