"""The calibrator catalogue, sidereal time, the primary beam, and "which group solves?".

Sidereal time uses the IAU 1982 GMST polynomial (good to ~0.1 s, ample for a 1.5 deg
transit window) so that the daemon needs no astropy at ingest time.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from supervisor.config import DEFAULT_CATALOGUE_PATH

INTEGRATION_S = 96 * 0.134217728  # 12.884901888 s, one DSA-110 integration

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
    """Read the calibrator TOML (``[[calibrator]]`` tables); raises ValueError naming the file.

    Parsed once per version of the file (path, modification time, size): every stage
    request of a calibrator group looks its calibrator up here."""
    path = path or DEFAULT_CATALOGUE_PATH
    stat = path.stat()
    return list(_load_cached(path.resolve(), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _load_cached(path: Path, _mtime_ns: int, _size: int) -> tuple[Calibrator, ...]:
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
    return tuple(out)


def gmst_deg(when: datetime) -> float:
    """Greenwich mean sidereal time (deg) at UTC ``when`` (IAU 1982; UT1 ~ UTC)."""
    d = (when - _J2000).total_seconds() / 86400.0
    t = d / 36525.0
    gmst = 280.46061837 + 360.98564736629 * d + 0.000387933 * t * t - t**3 / 38710000.0
    return gmst % 360.0


def lst_deg(when: datetime, longitude_deg: float) -> float:
    """Local mean sidereal time (deg) at east longitude ``longitude_deg``."""
    return (gmst_deg(when) + longitude_deg) % 360.0


PB_FWHM_FACTOR = 1.03  # Airy main lobe: FWHM = 1.03 lambda / D
SIDEREAL_DEG_PER_S = 360.98564736629 / 86400.0


def primary_beam_gain(offset_deg: float, freq_hz: float, dish_m: float) -> float:
    """Gaussian approximation of the Airy main lobe, FWHM = 1.03 lambda / D."""
    fwhm_deg = math.degrees(PB_FWHM_FACTOR * 299_792_458.0 / freq_hz / dish_m)
    return math.exp(-4.0 * math.log(2.0) * (offset_deg / fwhm_deg) ** 2)


@dataclass(frozen=True, slots=True)
class Sighting:
    """Where a catalogue calibrator is relative to a group's pointing (1.4 GHz beam).

    hour_angle_start_deg / hour_angle_end_deg: at the group's first and last moment;
    transits: the hour angle changes sign during the group; offset_deg and pb_gain: at the
    group's closest approach (the transit, or the nearer end); apparent_flux_jy: catalogue
    flux at 1.4 GHz times ``pb_gain``.
    """

    name: str
    hour_angle_start_deg: float
    hour_angle_end_deg: float
    transits: bool
    offset_deg: float
    pb_gain: float
    apparent_flux_jy: float

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hour_angle_start_deg": round(self.hour_angle_start_deg, 4),
            "hour_angle_end_deg": round(self.hour_angle_end_deg, 4),
            "transits": self.transits,
            "offset_deg": round(self.offset_deg, 4),
            "pb_gain": round(self.pb_gain, 4),
            "apparent_flux_jy": round(self.apparent_flux_jy, 4),
        }


def sighting(
    cal: Calibrator,
    *,
    start: datetime,
    duration_s: float,
    pointing_dec_deg: float,
    longitude_deg: float,
    dish_m: float,
) -> Sighting:
    """Where ``cal`` is during the group that starts at ``start`` and lasts ``duration_s``.

    The pointing centre moves with the sky's meridian (drift scan, RA = LST), so the
    calibrator's offset from it is smallest at transit (the declination offset) and grows
    with |hour angle| on either side."""
    ha0 = hour_angle_deg(cal, start, longitude_deg)
    ha1 = ha0 + duration_s * SIDEREAL_DEG_PER_S
    transits = ha0 <= 0.0 <= ha1
    closest_ha = 0.0 if transits else (ha0 if abs(ha0) < abs(ha1) else ha1)
    lst = (cal.ra_deg + closest_ha) % 360.0
    offset = angular_separation_deg(cal.ra_deg, cal.dec_deg, lst, pointing_dec_deg)
    gain = primary_beam_gain(offset, 1.4e9, dish_m)
    return Sighting(cal.name, ha0, ha1, transits, offset, gain, cal.flux_jy_1p4ghz * gain)


@dataclass(frozen=True, slots=True)
class CalibratorChoice:
    """The decision "does this group solve, and on what?", with what was weighed."""

    chosen: Calibrator | None
    sightings: tuple[Sighting, ...]
    rule: str

    def as_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "rule": self.rule,
            "candidates": [s.as_dict() for s in self.sightings],
        }


def choose_calibrator(
    catalogue: list[Calibrator],
    *,
    start: datetime,
    duration_s: float,
    pointing_dec_deg: float,
    longitude_deg: float,
    max_dec_offset_deg: float,
    dish_m: float,
    min_apparent_flux_jy: float,
) -> CalibratorChoice:
    """Decide whether the group solves its own calibration.

    A group solves on a catalogue calibrator within ``max_dec_offset_deg`` of the pointing
    declination that *transits during the group* — the group in which it is nearest the
    meridian, where its primary-beam gain is highest; groups tile time, so exactly one group
    holds each transit. Among several, the highest apparent flux wins; a transit whose
    apparent flux is below ``min_apparent_flux_jy`` is too faint to solve on. Groups that
    only see a calibrator off transit use the transit group's tables (or solve on it as a
    later fallback tier; see :mod:`supervisor.calibration`).
    """
    seen = tuple(
        sighting(
            cal,
            start=start,
            duration_s=duration_s,
            pointing_dec_deg=pointing_dec_deg,
            longitude_deg=longitude_deg,
            dish_m=dish_m,
        )
        for cal in catalogue
        if abs(cal.dec_deg - pointing_dec_deg) <= max_dec_offset_deg
    )
    by_name = {cal.name: cal for cal in catalogue}
    transiting = [s for s in seen if s.transits and s.apparent_flux_jy >= min_apparent_flux_jy]
    best = max(transiting, key=lambda s: s.apparent_flux_jy, default=None)
    rule = (
        f"transit within the group, apparent flux >= {min_apparent_flux_jy:g} Jy, "
        f"|dec offset| <= {max_dec_offset_deg:g} deg; brightest wins"
    )
    # Only near ones are worth recording: a calibrator half a sky away says nothing.
    near = tuple(s for s in seen if abs(s.hour_angle_start_deg) < 30.0)
    return CalibratorChoice(by_name[best.name] if best else None, near, rule)


def calibrators_in_beam(
    catalogue: list[Calibrator],
    *,
    when: datetime,
    pointing_dec_deg: float,
    longitude_deg: float,
    dish_m: float,
    min_apparent_flux_jy: float,
    exclude: tuple[str, ...] = (),
) -> list[Sighting]:
    """Catalogue calibrators whose apparent flux at ``when`` (group mid-time) is at least
    ``min_apparent_flux_jy``, brightest first."""
    out = []
    for cal in catalogue:
        if cal.name in exclude:
            continue
        s = sighting(
            cal,
            start=when,
            duration_s=0.0,
            pointing_dec_deg=pointing_dec_deg,
            longitude_deg=longitude_deg,
            dish_m=dish_m,
        )
        if s.apparent_flux_jy >= min_apparent_flux_jy:
            out.append(s)
    return sorted(out, key=lambda s: -s.apparent_flux_jy)


def hour_angle_deg(cal: Calibrator, when: datetime, longitude_deg: float) -> float:
    """Hour angle (deg, -180..180) of ``cal`` at ``when``; 0 on the meridian."""
    return ((lst_deg(when, longitude_deg) - cal.ra_deg + 180.0) % 360.0) - 180.0


def angular_separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
