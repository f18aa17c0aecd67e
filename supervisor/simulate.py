"""Write DSA-110-shaped synthetic groups of UVH5 subbands with a known sky, gains and noise.

A night of ``n_groups`` consecutive 309 s groups observed in meridian drift-scan mode at a
fixed pointing declination. Each group is 16 files ``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5`` (sb00
holds the highest frequencies; channels descend inside each file, as the correlator writes
them) with per-file name-timestamp jitter. The sky is a set of point sources: an optional
catalogue calibrator that transits in chosen groups, plus fainter field sources. Every
visibility is corrupted by per-antenna complex gains (constant for the night, with a slow
phase drift) times a bandpass (ripple and delay), and thermal noise from the radiometer
equation. ``truth/<group_id>.json`` and ``.npz`` record what was injected.

Conventions (pyuvdata): ``V_ij = g_i conj(g_j) V_sky + n`` with ``ant_1 = i``, ``ant_2 = j``
and ``b_ij = x_j - x_i``. pyuvdata's ``write_ms`` conjugates the data into CASA's
convention, so CASA's gaincal solutions equal ``conj(g)``: the truth file stores both.

Simplification: only sources within ``field_radius_deg`` of a group's phase centre are
simulated (apparent flux = catalogue flux x a Gaussian primary beam); far sidelobes of
sources outside the field are not.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from supervisor.calibrators import (
    INTEGRATION_S,
    Calibrator,
    angular_separation_deg,
    load_catalogue,
    lst_deg,
)

C_M_S = 299_792_458.0
BAND_LOW_HZ = 1311.25e6
BAND_HIGH_HZ = 1498.75e6
N_SUBBANDS = 16
PB_FWHM_FACTOR = 1.03  # primary beam FWHM = 1.03 lambda / D (Airy main lobe)
DEAD_POWER = 0.01  # a dead antenna's system power relative to a working one (LNA off)
NOISY_POWER = 9.0  # a noisy antenna's (3 x the noise on its baselines)


FAULT_KINDS = (
    "drop",
    "truncate",
    "duplicate",
    "garbage",
    "flagged",
    "nan_vis",
    "nan_some_vis",
    "nan_uvw",
)


@dataclass(frozen=True)
class Fault:
    """A deliberate defect in one subband file of one group, for tests.

    kind: ``drop`` (file not written), ``truncate`` (cut to half its size), ``duplicate``
    (a second file for the same subband, 5 s later in its name), ``garbage`` (random
    bytes instead of HDF5), ``flagged`` (a valid file whose every visibility is flagged),
    ``nan_vis`` (every visibility NaN), ``nan_some_vis`` (2 % of the visibilities NaN, 1 %
    +Inf), ``nan_uvw`` (non-finite uvw in a tenth of the baseline-times). The non-finite
    values are written into the finished file with h5py (pyuvdata refuses to write them).
    """

    kind: str
    group_index: int
    subband: int


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate. Times UTC; angles in degrees; fluxes in Jy at 1.4 GHz."""

    n_groups: int = 1
    start: datetime | None = None  # first group's nominal start; None: derived (see below)
    n_antennas: int = 8
    n_channels_per_subband: int = 4
    n_times: int = 24
    dec_deg: float | None = None  # None: the calibrator's dec, else 33.0
    calibrator: str | None = None  # transits in group ``calibrator_group``
    calibrator_group: int = 0
    n_field_sources: int = 3
    field_radius_deg: float = 0.25
    # sky: per_group (n_field_sources fresh sources near each group's centre, within half
    # field_radius_deg) or persistent (one sky for the night, sky_density_per_deg2 sources
    # with a Euclidean N(>S) ~ S^-1.5 between sky_flux_min_jy and sky_flux_max_jy; each
    # group sees those within field_radius_deg of its centre, so neighbours share sources)
    sky: str = "per_group"
    sky_density_per_deg2: float = 3.0
    sky_flux_min_jy: float = 0.02
    sky_flux_max_jy: float = 1.0
    sefd_jy: float = 6500.0
    jitter_s: int = 30  # name timestamps of sb01..15 lie within +-jitter_s of sb00's
    phase: str = "meridian"  # meridian (sidereal centre at mid-group) or drift
    autos: bool = True
    gains: bool = True
    seed: int = 1
    faults: tuple[Fault, ...] = ()
    telescope_name: str = "DSA_110"
    layout: str = "t"  # t (both arms) or ew (every antenna on the E-W arm: co-linear)
    channel_order: str = "descending"  # within each file, as DSA-110 writes; or ascending
    header_shapes: str = "new"  # new (pyuvdata >= 3) or old (spectral-window axis, 2-D freqs)
    latitude_deg: float = 37.2339
    longitude_deg: float = -118.2825
    altitude_m: float = 1222.0
    dish_diameter_m: float = 4.65
    catalogue_flux_error: float = 0.03  # the sky catalogue's fractional flux error (rms)
    catalogue_position_error_arcsec: float = 1.0  # ... and position error per coordinate
    catalogue_limit_mjy: float = 2.5  # ... and its completeness limit (NVSS: ~2.5 mJy)
    # Interference and broken antennas (see RfiSpec); off by default: nothing else changes.
    rfi: bool = False
    rfi_channel_fraction: float = 0.02  # persistent narrow-band channels, all baselines
    rfi_bursts: int = 2  # broadband bursts per group: one integration, every channel
    rfi_baselines: int = 3  # baselines with a strong band-limited interferer, all times
    dead_antennas: tuple[int, ...] = ()  # no signal; system power x DEAD_POWER
    noisy_antennas: tuple[int, ...] = ()  # system power x NOISY_POWER

    def __post_init__(self) -> None:
        problems = []
        if self.n_groups < 1:
            problems.append(f"groups={self.n_groups}: must be >= 1")
        if self.n_antennas < 3:
            problems.append(f"nants={self.n_antennas}: must be >= 3")
        if self.n_channels_per_subband < 1:
            problems.append(f"nchan={self.n_channels_per_subband}: must be >= 1")
        if self.n_times < 1:
            problems.append(f"ntimes={self.n_times}: must be >= 1")
        if not 0 <= self.jitter_s <= 60:
            problems.append(f"jitter={self.jitter_s}: must be within 0..60 s")
        if self.layout not in ("t", "ew"):
            problems.append(f"layout={self.layout!r}: must be t or ew")
        if self.header_shapes not in ("new", "old"):
            problems.append(f"header_shapes={self.header_shapes!r}: must be new or old")
        if self.channel_order not in ("descending", "ascending"):
            problems.append(
                f"channel_order={self.channel_order!r}: must be descending or ascending"
            )
        if self.sky not in ("per_group", "persistent"):
            problems.append(f"sky={self.sky!r}: must be per_group or persistent")
        if not 0 < self.sky_flux_min_jy < self.sky_flux_max_jy:
            problems.append("sky fluxes: need 0 < sky_flux_min_jy < sky_flux_max_jy")
        if self.phase not in ("meridian", "drift"):
            problems.append(f"phase={self.phase!r}: must be meridian or drift")
        if self.dec_deg is not None and not -30 <= self.dec_deg <= 90:
            problems.append(f"dec={self.dec_deg}: must be within -30..90 deg (visible from OVRO)")
        if not 0 <= self.calibrator_group < self.n_groups:
            problems.append(f"calibrator_group={self.calibrator_group}: outside 0..groups-1")
        broken = (*self.dead_antennas, *self.noisy_antennas)
        if any(not 0 <= a < self.n_antennas for a in broken) or len(set(broken)) < len(broken):
            problems.append(f"dead/noisy antennas {broken}: must be distinct, in 0..nants-1")
        if not 0 <= self.rfi_channel_fraction <= 0.5:
            problems.append(f"rfi_channel_fraction={self.rfi_channel_fraction}: within 0..0.5")
        for f in self.faults:
            if f.kind not in FAULT_KINDS:
                problems.append(f"fault {f.kind!r}: must be one of {', '.join(FAULT_KINDS)}")
            if not 0 <= f.subband < N_SUBBANDS or not 0 <= f.group_index < self.n_groups:
                problems.append(f"fault {f.kind}:{f.group_index}:{f.subband}: no such file")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def group_duration_s(self) -> float:
        return self.n_times * INTEGRATION_S


@dataclass
class GroupTruth:
    """What was injected into one group (written as ``truth/<group_id>.json``)."""

    group_id: str
    files: list[str]
    start_utc: str
    mid_utc: str
    phase: str
    phase_center_ra_deg: float
    phase_center_dec_deg: float
    pointing_dec_deg: float
    calibrator: str | None
    n_antennas: int
    antenna_names: list[str]
    n_times: int
    integration_s: float
    channel_width_hz: float
    freq_low_hz: float
    freq_high_hz: float
    sefd_jy: float
    sigma_vis_jy: float  # per real/imaginary part, per visibility
    sigma_image_jy: float  # Stokes I, natural weighting, all cross-correlations
    sources: list[dict[str, float | str]]
    faults: list[dict[str, object]] = field(default_factory=list)
    # Injected interference and broken antennas: see rfi_truth_mask. Channel indices count
    # the whole band in ascending frequency (the MS's order).
    rfi: dict[str, Any] = field(default_factory=dict)
    gain_convention: str = (
        "pyuvdata: V_ij = g_i conj(g_j) V_sky; CASA (after write_ms) solves conj(g). "
        "npz: gains_pyuvdata (Ntimes, Nants, Npol=2 [XX,YY]) and bandpass_pyuvdata "
        "(Nants, 2, Nfreq, ascending freq); *_casa arrays are their conjugates."
    )


def subband_frequencies(subband: int, n_channels: int) -> tuple[np.ndarray, float]:
    """Channel centres (Hz, descending) and the (negative) channel width of one subband."""
    width = (BAND_HIGH_HZ - BAND_LOW_HZ) / N_SUBBANDS
    top = BAND_HIGH_HZ - subband * width
    dnu = width / n_channels
    return top - (np.arange(n_channels) + 0.5) * dnu, -dnu


def radiometer_sigma_vis(sefd_jy: float, channel_width_hz: float, integration_s: float) -> float:
    """Noise per real/imaginary part of one visibility: SEFD / sqrt(2 dnu tau)."""
    return sefd_jy / math.sqrt(2.0 * abs(channel_width_hz) * integration_s)


def radiometer_sigma_image(
    sefd_jy: float, n_antennas: int, bandwidth_hz: float, duration_s: float, n_pol: int = 2
) -> float:
    """Stokes I image noise, natural weighting: SEFD / sqrt(n_pol N (N-1) dnu t)."""
    return sefd_jy / math.sqrt(n_pol * n_antennas * (n_antennas - 1) * bandwidth_hz * duration_s)


def t_array_layout(n_antennas: int, rng: np.random.Generator) -> np.ndarray:
    """ENU positions (m) of a synthetic DSA-110-like "T": an E-W arm (+-575 m, denser near
    the centre) and a N-S arm (to ~1200 m).

    Antennas sit at quantiles along each arm with random jitter, so that even 8 antennas give
    short, medium and long spacings on both arms (uniform random draws can bunch them and
    leave a PSF that CLEAN cannot handle). Not the real pads; at least 6 m apart.
    """
    n_ew = max(2, math.ceil(n_antennas / 2))
    n_ns = n_antennas - n_ew
    q = (np.arange(n_ew) + 0.5) / n_ew * 2.0 - 1.0  # -1..1
    q = q + rng.uniform(-0.35, 0.35, n_ew) / n_ew
    x = np.sign(q) * np.abs(q) ** 1.5 * 575.0
    ew = np.stack([x, rng.normal(0, 0.5, n_ew), rng.normal(0, 0.2, n_ew)], axis=1)
    qn = (np.arange(n_ns) + 0.5) / max(n_ns, 1)
    qn = np.clip(qn + rng.uniform(-0.35, 0.35, n_ns) / max(n_ns, 1), 0.02, 1.0)
    y = 30.0 + qn**1.3 * 1170.0
    ns = np.stack([rng.normal(0, 0.5, n_ns), y, rng.normal(0, 0.2, n_ns)], axis=1)
    enu = np.concatenate([ew, ns], axis=0)
    for i in range(len(enu)):
        for j in range(i):
            while np.linalg.norm(enu[i] - enu[j]) < 6.0:
                enu[i, 0] += 6.5
    return enu


def to_old_uvh5_shapes(path: Path) -> None:
    """Rewrite a UVH5 file the way writers built on pyuvdata < 3 laid it out: a
    spectral-window axis in the data arrays, a 2-D ``freq_array`` and a scalar
    ``channel_width``."""
    import h5py

    with h5py.File(path, "r+") as fh:
        header, data = fh["Header"], fh["Data"]
        freqs = header["freq_array"][()]
        widths = np.atleast_1d(header["channel_width"][()])
        del header["freq_array"], header["channel_width"]
        header["freq_array"] = freqs.reshape(1, -1)
        header["channel_width"] = float(widths[0])
        if "flex_spw" in header:
            del header["flex_spw"]
        if "flex_spw_id_array" in header:
            del header["flex_spw_id_array"]
        for name in ("visdata", "flags", "nsamples"):
            values = data[name][()]
            del data[name]
            data.create_dataset(name, data=values[:, np.newaxis, :, :])


def ew_arm_layout(n_antennas: int, rng: np.random.Generator) -> np.ndarray:
    """Every antenna on the E-W arm (+-575 m): what the array is with its N-S arm down, and
    what another DSA-110 simulator wrote. Co-linear baselines: a beam hundreds of times
    longer than it is wide."""
    q = (np.arange(n_antennas) + 0.5) / n_antennas * 2.0 - 1.0
    q = q + rng.uniform(-0.35, 0.35, n_antennas) / n_antennas
    x = np.sign(q) * np.abs(q) ** 1.5 * 575.0
    enu = np.stack([x, rng.normal(0, 0.5, n_antennas), rng.normal(0, 0.2, n_antennas)], axis=1)
    for i in range(n_antennas):
        for j in range(i):
            while abs(enu[i, 0] - enu[j, 0]) < 6.0:
                enu[i, 0] += 6.5
    return enu


def first_transit_after(cal: Calibrator, after: datetime, longitude_deg: float) -> datetime:
    """The first time after ``after`` when LST equals the calibrator's RA (to ~0.1 s)."""
    sidereal_rate = 360.98564736629 / 86400.0  # deg of LST per second of UTC
    delta = (cal.ra_deg - lst_deg(after, longitude_deg)) % 360.0
    t = after + timedelta(seconds=delta / sidereal_rate)
    for _ in range(3):  # refine: lst_deg is not exactly linear over a day
        err = ((cal.ra_deg - lst_deg(t, longitude_deg) + 180.0) % 360.0) - 180.0
        t += timedelta(seconds=err / sidereal_rate)
    return t


def _night_start(spec: SimulationSpec, cal: Calibrator | None) -> datetime:
    """First group's nominal start, whole seconds: the calibrator transits mid-group."""
    base = spec.start or datetime(2025, 10, 5, 12, 30, tzinfo=UTC)
    if cal is None:
        return base.replace(microsecond=0)
    transit = first_transit_after(cal, base, spec.longitude_deg)
    offset = (spec.calibrator_group + 0.5) * spec.group_duration_s
    return (transit - timedelta(seconds=offset)).replace(microsecond=0)


def _gaussian_beam(offset_deg: np.ndarray, freq_hz: np.ndarray, dish_m: float) -> np.ndarray:
    fwhm_deg = np.degrees(PB_FWHM_FACTOR * C_M_S / freq_hz / dish_m)
    return np.exp(-4.0 * math.log(2.0) * (offset_deg[:, None] / fwhm_deg[None, :]) ** 2)


def simulate(outdir: str | os.PathLike[str], spec: SimulationSpec) -> list[GroupTruth]:
    """Write ``spec.n_groups`` groups into ``outdir`` (and truth into ``outdir/truth``)."""
    warnings.filterwarnings("ignore", message=".*dubious year.*")
    warnings.filterwarnings("ignore", message=".*leap-second.*")
    from astropy.utils import iers

    iers.conf.auto_download = False  # offline: never fetch IERS-A tables
    iers.conf.auto_max_age = None
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from pyuvdata import Telescope, UVData
    from pyuvdata import utils as uvutils

    out = Path(outdir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    catalogue = load_catalogue()
    cal = None
    if spec.calibrator is not None:
        by_name = {c.name.lower(): c for c in catalogue}
        cal = by_name.get(spec.calibrator.lower())
        if cal is None:
            known = ", ".join(c.name for c in catalogue)
            raise ValueError(f"calibrator {spec.calibrator!r} is not in the catalogue ({known})")
    dec_deg = spec.dec_deg if spec.dec_deg is not None else (cal.dec_deg if cal else 33.0)
    night_start = _night_start(spec, cal)

    loc = EarthLocation.from_geodetic(
        lon=spec.longitude_deg * u.deg, lat=spec.latitude_deg * u.deg, height=spec.altitude_m * u.m
    )
    enu = (
        t_array_layout(spec.n_antennas, rng)
        if spec.layout == "t"
        else ew_arm_layout(spec.n_antennas, rng)
    )
    ecef = uvutils.ECEF_from_ENU(
        enu,
        latitude=math.radians(spec.latitude_deg),
        longitude=math.radians(spec.longitude_deg),
        altitude=spec.altitude_m,
    )
    tel_xyz = np.array([loc.x.to_value(u.m), loc.y.to_value(u.m), loc.z.to_value(u.m)])
    ant_numbers = np.arange(spec.n_antennas)
    ant_names = [f"DSA{n + 1:03d}" for n in ant_numbers]
    telescope = Telescope.new(
        name=spec.telescope_name,
        location=loc,
        antenna_positions=ecef - tel_xyz,
        antenna_names=ant_names,
        antenna_numbers=ant_numbers,
        instrument=spec.telescope_name,
        antenna_diameters=np.full(spec.n_antennas, spec.dish_diameter_m),
        feeds=["x", "y"],
        mount_type="fixed",
        update_from_known=False,
    )

    # Instrument corruptions for the whole night: G(t) per antenna and feed, B(nu).
    nch = spec.n_channels_per_subband
    all_freqs = np.concatenate([subband_frequencies(sb, nch)[0] for sb in range(N_SUBBANDS)])
    g_amp = rng.uniform(0.8, 1.2, (spec.n_antennas, 2))
    g_phase = rng.uniform(-math.pi, math.pi, (spec.n_antennas, 2))
    drift_rad_per_s = np.radians(rng.normal(0.0, 2.0, (spec.n_antennas, 2))) / 3600.0
    delay_ns = rng.normal(0.0, 2.0, (spec.n_antennas, 2))
    ripple_phase = rng.uniform(0, 2 * math.pi, (spec.n_antennas, 2))
    if not spec.gains:
        g_amp[:] = 1.0
        g_phase[:] = 0.0
        drift_rad_per_s[:] = 0.0
        delay_ns[:] = 0.0

    def bandpass(freqs: np.ndarray) -> np.ndarray:  # (Nants, 2, Nf)
        if not spec.gains:
            return np.ones((spec.n_antennas, 2, len(freqs)), dtype=complex)
        x = (freqs - 1.405e9) / (BAND_HIGH_HZ - BAND_LOW_HZ)
        ripple = 1.0 + 0.1 * np.sin(2 * math.pi * 1.5 * x[None, None, :] + ripple_phase[..., None])
        return ripple * np.exp(2j * math.pi * freqs[None, None, :] * delay_ns[..., None] * 1e-9)

    antpairs = [
        (i, j)
        for i in range(spec.n_antennas)
        for j in range(i if spec.autos else i + 1, spec.n_antennas)
    ]
    ap = np.array(antpairs)
    nbl = len(ap)
    is_auto = ap[:, 0] == ap[:, 1]
    baselines = enu[ap[:, 1]] - enu[ap[:, 0]]  # pyuvdata: x_j - x_i, (Nbl, 3) metres
    cross_width = (BAND_HIGH_HZ - BAND_LOW_HZ) / N_SUBBANDS / nch
    faults = {(f.group_index, f.subband): f for f in spec.faults}
    power = np.ones(spec.n_antennas)  # system power relative to a working antenna
    power[list(spec.dead_antennas)] = DEAD_POWER
    power[list(spec.noisy_antennas)] = NOISY_POWER
    alive = np.ones(spec.n_antennas)
    alive[list(spec.dead_antennas)] = 0.0  # a dead antenna sees no sky
    noise_scale = np.sqrt(power[ap[:, 0]] * power[ap[:, 1]])  # (Nbl,)
    night_sky = persistent_sky(spec, night_start, dec_deg) if spec.sky == "persistent" else []
    # Interference has its own random stream: turning it on changes nothing else drawn.
    rng_rfi = np.random.default_rng(spec.seed + 9_000_011)
    truths: list[GroupTruth] = []

    for gi in range(spec.n_groups):
        start = night_start + timedelta(seconds=gi * spec.group_duration_s)
        t_start = Time(start)
        times = t_start + (np.arange(spec.n_times) + 0.5) * INTEGRATION_S * u.s
        t_mid = t_start + 0.5 * spec.group_duration_s * u.s
        ra_mid = t_mid.sidereal_time("apparent", longitude=loc.lon).deg
        centre = SkyCoord(ra=ra_mid * u.deg, dec=dec_deg * u.deg, frame="icrs")
        elapsed = (times - Time(night_start)).to_value(u.s)
        gains = g_amp[None] * np.exp(
            1j * (g_phase[None] + drift_rad_per_s[None] * elapsed[:, None, None])
        )  # (Nt, Nants, 2)

        # Sky: the calibrator if it is in the field, plus faint field sources.
        sources: list[dict[str, float | str]] = []
        if cal is not None:
            sep = angular_separation_deg(cal.ra_deg, cal.dec_deg, ra_mid, dec_deg)
            if sep <= spec.field_radius_deg:
                sources.append(
                    {
                        "name": cal.name,
                        "ra_deg": cal.ra_deg,
                        "dec_deg": cal.dec_deg,
                        "flux_jy_1p4ghz": cal.flux_jy_1p4ghz,
                        "spectral_index": cal.spectral_index,
                    }
                )
        cosd = math.cos(math.radians(dec_deg))
        if spec.sky == "persistent":
            sources += [
                dict(src)
                for src in night_sky
                if angular_separation_deg(src["ra_deg"], src["dec_deg"], ra_mid, dec_deg)  # type: ignore[arg-type]
                <= spec.field_radius_deg
            ]
        for k in range(spec.n_field_sources if spec.sky == "per_group" else 0):
            r = spec.field_radius_deg * 0.5 * math.sqrt(rng.uniform(0.05, 1.0))
            theta = rng.uniform(0, 2 * math.pi)
            sources.append(
                {
                    "name": f"SRC{k + 1}",
                    "ra_deg": (ra_mid + r * math.cos(theta) / cosd) % 360.0,
                    "dec_deg": dec_deg + r * math.sin(theta),
                    "flux_jy_1p4ghz": float(rng.uniform(0.1, 0.5)),
                    "spectral_index": float(rng.normal(-0.7, 0.2)),
                }
            )
        offsets = np.array(
            [angular_separation_deg(s["ra_deg"], s["dec_deg"], ra_mid, dec_deg) for s in sources]  # type: ignore[arg-type]
        )
        for s, off in zip(sources, offsets, strict=True):
            s["offset_deg"] = float(off)
            s["beam_gain_1p4ghz"] = float(
                _gaussian_beam(np.array([off]), np.array([1.4e9]), spec.dish_diameter_m)[0, 0]
            )

        frame = AltAz(obstime=times[:, None], location=loc, pressure=0 * u.hPa)

        def enu_dirs(coords: SkyCoord, frame: AltAz = frame) -> np.ndarray:
            aa = coords[None, :].transform_to(frame)
            alt, az = aa.alt.rad, aa.az.rad
            return np.stack(
                [np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1
            )

        if spec.phase == "meridian":
            s0 = enu_dirs(SkyCoord([centre]))[:, 0, :]
        else:  # fringe-stopped on the meridian at the pointing declination
            el = math.radians(90.0 - abs(spec.latitude_deg - dec_deg))
            az = 0.0 if dec_deg > spec.latitude_deg else math.pi
            s0 = np.tile(
                [math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)],
                (spec.n_times, 1),
            )
        if sources:
            src_coords = SkyCoord(
                ra=[s["ra_deg"] for s in sources] * u.deg,
                dec=[s["dec_deg"] for s in sources] * u.deg,
                frame="icrs",
            )
            geo_m = np.einsum("bk,tsk->tbs", baselines, enu_dirs(src_coords) - s0[:, None, :])
        else:
            geo_m = np.zeros((spec.n_times, nbl, 0))

        # A template with uvw and phase centre computed once; subbands select from it.
        template = UVData.new(
            freq_array=all_freqs,
            polarization_array=["xx", "yy"],
            times=times.jd,
            telescope=telescope,
            antpairs=ap,
            do_blt_outer=True,
            integration_time=INTEGRATION_S,
            channel_width=-cross_width,
            vis_units="uncalib",
            history="contimg-supervisor simulate: synthetic DSA-110-shaped group",
            time_axis_faster_than_bls=False,
        )
        if spec.phase == "meridian":
            template.phase(
                ra=centre.ra.rad,
                dec=centre.dec.rad,
                epoch="J2000",
                cat_name="MERIDIAN_MID",
                cat_type="sidereal",
                use_ant_pos=True,
            )
        else:
            el = math.radians(90.0 - abs(spec.latitude_deg - dec_deg))
            az = 0.0 if dec_deg > spec.latitude_deg else math.pi
            template.phase(
                lon=az,
                lat=el,
                cat_type="driftscan",
                cat_name="MERIDIAN_DRIFT",
                phase_frame="altaz",
                use_ant_pos=True,
            )
        template.extra_keywords.update(
            {"phase_center_dec": math.radians(dec_deg), "ha_phase_center": 0.0, "synthetic": True}
        )
        template.blt_order = ("time", "baseline")

        rfi_plan = plan_rfi(spec, ap, N_SUBBANDS * nch, rng_rfi) if spec.rfi else {}
        rfi_plan.update(
            dead_antennas=list(spec.dead_antennas), noisy_antennas=list(spec.noisy_antennas)
        )
        files: list[str] = []
        applied_faults: list[dict[str, object]] = []
        sb_offsets = rng.integers(-spec.jitter_s, spec.jitter_s + 1, N_SUBBANDS)
        sb_offsets[0] = 0
        for sb in range(N_SUBBANDS):
            freqs, _ = subband_frequencies(sb, nch)
            chans = np.arange(sb * nch, (sb + 1) * nch)
            data = _subband_visibilities(
                freqs,
                sources,
                offsets,
                geo_m,
                gains,
                bandpass(freqs),
                ap,
                is_auto,
                spec,
                power,
                alive,
            )
            rng_noise = rng.standard_normal((2, *data.shape))
            sigma = radiometer_sigma_vis(spec.sefd_jy, cross_width, INTEGRATION_S)
            if spec.sefd_jy > 0:
                noise = sigma * (rng_noise[0] + 1j * rng_noise[1])
                noise *= noise_scale[None, :, None, None]
                noise[:, is_auto] = 0.0
                data = data + noise
            if spec.rfi:
                data[:, ~is_auto] += _subband_rfi(
                    rfi_plan, sb, nch, spec.n_times, sigma, rng_rfi, ap[~is_auto]
                )[..., None]
            uvd = template.select(freq_chans=chans, inplace=False)
            uvd.data_array = data.reshape(spec.n_times * nbl, nch, 2).astype(np.complex64)
            fault = faults.get((gi, sb))
            flagged = fault is not None and fault.kind == "flagged"
            uvd.flag_array = np.full(uvd.data_array.shape, flagged, dtype=bool)
            uvd.nsample_array = np.ones(uvd.data_array.shape, dtype=np.float32)
            if spec.channel_order == "ascending":
                uvd.reorder_freqs(channel_order="freq")
            stamp = (start + timedelta(seconds=int(sb_offsets[sb]))).strftime("%Y-%m-%dT%H:%M:%S")
            path = out / f"{stamp}_sb{sb:02d}.hdf5"
            if fault is not None and fault.kind == "drop":
                applied_faults.append({**asdict(fault), "path": str(path)})
                continue
            uvd.write_uvh5(str(path), clobber=True)
            if spec.header_shapes == "old":
                to_old_uvh5_shapes(path)
            files.append(path.name)
            if fault is not None:
                applied_faults.append({**asdict(fault), "path": str(path)})
                if fault.kind != "flagged":
                    _apply_fault(fault, path, uvd, start, rng)

        mid = start + timedelta(seconds=0.5 * spec.group_duration_s)
        # Ingest keys a group on its earliest file name: use the same id here.
        group_id = (
            min(name[:19] for name in files) if files else start.strftime("%Y-%m-%dT%H:%M:%S")
        )
        truth = GroupTruth(
            group_id=group_id,
            files=files,
            start_utc=start.isoformat(),
            mid_utc=mid.isoformat(),
            phase=spec.phase,
            phase_center_ra_deg=float(ra_mid),
            phase_center_dec_deg=dec_deg,
            pointing_dec_deg=dec_deg,
            calibrator=cal.name
            if cal is not None and sources and sources[0]["name"] == cal.name
            else None,
            n_antennas=spec.n_antennas,
            antenna_names=ant_names,
            n_times=spec.n_times,
            integration_s=INTEGRATION_S,
            channel_width_hz=cross_width,
            freq_low_hz=float(all_freqs.min()),
            freq_high_hz=float(all_freqs.max()),
            sefd_jy=spec.sefd_jy,
            sigma_vis_jy=radiometer_sigma_vis(spec.sefd_jy, cross_width, INTEGRATION_S),
            sigma_image_jy=radiometer_sigma_image(
                spec.sefd_jy, spec.n_antennas, BAND_HIGH_HZ - BAND_LOW_HZ, spec.group_duration_s
            ),
            sources=sources,
            faults=applied_faults,
            rfi=rfi_plan,
        )
        truths.append(truth)
        (out / "truth" / f"{group_id}.json").write_text(json.dumps(asdict(truth), indent=1))
        ascending = np.sort(all_freqs)
        bp = bandpass(ascending)
        np.savez(
            out / "truth" / f"{group_id}.npz",
            gains_pyuvdata=gains,
            gains_casa=np.conj(gains),
            bandpass_pyuvdata=bp,
            bandpass_casa=np.conj(bp),
            freqs_hz=ascending,
            times_jd=times.jd,
            enu_m=enu,
            delay_ns=delay_ns,
        )
    write_sky_catalogue(out / "truth" / "sky_catalogue.csv", truths, spec)
    return truths


def write_sky_catalogue(path: Path, truths: list[GroupTruth], spec: SimulationSpec) -> int:
    """A survey catalogue of the night's field sources (NVSS-like CSV, the format of
    supervisor/skymodel.py) with a real survey's errors: flux densities off by
    ``catalogue_flux_error`` (fractional rms), positions by ``catalogue_position_error_arcsec``
    (rms per coordinate), sources below ``catalogue_limit_mjy`` left out. The catalogue
    calibrators are left out too (they are modelled from their own catalogue). Its own
    random stream: writing it changes nothing else the simulator draws. Returns the rows."""
    rng = np.random.default_rng(spec.seed + 7_000_003)
    calibrators = {c.name for c in load_catalogue()}
    rows = []
    seen: set[str] = set()
    for truth in truths:
        for src in truth.sources:
            key = f"{src['ra_deg']:.6f}{src['dec_deg']:+.6f}"
            if src["name"] in calibrators or key in seen:
                continue
            seen.add(key)
            flux_mjy = float(src["flux_jy_1p4ghz"]) * 1000.0
            if flux_mjy < spec.catalogue_limit_mjy:
                continue
            sigma_deg = spec.catalogue_position_error_arcsec / 3600.0
            dec = float(src["dec_deg"]) + rng.normal(0.0, sigma_deg)
            ra = float(src["ra_deg"]) + rng.normal(0.0, sigma_deg) / math.cos(math.radians(dec))
            measured = flux_mjy * (1.0 + rng.normal(0.0, spec.catalogue_flux_error))
            rows.append(
                f"{truth.group_id}_{src['name']},{ra % 360.0:.7f},{dec:.7f},{measured:.2f},"
                f"{float(src['spectral_index']):.3f}"
            )
    path.write_text(
        "# Simulated survey catalogue (NVSS-like): flux density at 1.4 GHz in mJy, J2000.\n"
        f"# errors: {spec.catalogue_flux_error:.0%} flux, "
        f"{spec.catalogue_position_error_arcsec:g} arcsec position; limit "
        f"{spec.catalogue_limit_mjy:g} mJy\n"
        "name,ra_deg,dec_deg,flux_mjy,spectral_index\n" + "".join(r + "\n" for r in rows)
    )
    return len(rows)


def persistent_sky(
    spec: SimulationSpec, night_start: datetime, dec_deg: float
) -> list[dict[str, float | str]]:
    """One sky for the whole night (its own random stream): sources over the strip of RA
    the night's groups sweep, +- field_radius_deg, at sky_density_per_deg2, with fluxes
    from N(>S) ~ S^-1.5 between sky_flux_min_jy and sky_flux_max_jy (Jy at 1.4 GHz)."""
    rng = np.random.default_rng(spec.seed + 5_000_007)
    sidereal_deg_per_s = 360.98564736629 / 86400.0
    ra0 = lst_deg(night_start, spec.longitude_deg)
    span = spec.n_groups * spec.group_duration_s * sidereal_deg_per_s
    radius = spec.field_radius_deg
    cosd = math.cos(math.radians(dec_deg))
    width_ra = span + 2 * radius / cosd  # degrees of RA
    area = width_ra * cosd * 2 * radius
    n = int(rng.poisson(spec.sky_density_per_deg2 * area))
    lo, hi = spec.sky_flux_min_jy, spec.sky_flux_max_jy
    u = rng.random(n)
    # inverse CDF of N(>S) ~ S^-1.5 truncated to [lo, hi]
    flux = (lo**-1.5 - u * (lo**-1.5 - hi**-1.5)) ** (-1.0 / 1.5)
    ra = ra0 - radius / cosd + rng.random(n) * width_ra
    dec = dec_deg - radius + rng.random(n) * 2 * radius
    return [
        {
            "name": f"SKY{k + 1:04d}",
            "ra_deg": float(ra[k] % 360.0),
            "dec_deg": float(dec[k]),
            "flux_jy_1p4ghz": float(flux[k]),
            "spectral_index": float(rng.normal(-0.7, 0.2)),
        }
        for k in range(n)
    ]


def plan_rfi(
    spec: SimulationSpec, ap: np.ndarray, n_chan: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Where one group's interference goes, and how strong it is (in units of the
    per-visibility noise sigma): persistent narrow-band channels on every baseline, broadband
    bursts of one integration on every baseline, and band-limited interferers on a few
    short baselines (the ones nearest a local emitter). Channels count the band ascending."""
    cross = np.flatnonzero(ap[:, 0] != ap[:, 1])
    n_rfi_chan = (
        max(1, round(spec.rfi_channel_fraction * n_chan)) if spec.rfi_channel_fraction else 0
    )
    channels = sorted(int(c) for c in rng.choice(n_chan, n_rfi_chan, replace=False))
    bursts = sorted(
        int(t) for t in rng.choice(spec.n_times, min(spec.rfi_bursts, spec.n_times), replace=False)
    )
    baselines = []
    for k in rng.choice(cross, min(spec.rfi_baselines, len(cross)), replace=False):
        width = max(1, int(n_chan * rng.uniform(0.03, 0.10)))
        lo = int(rng.integers(0, n_chan - width + 1))
        baselines.append(
            {
                "ant1": int(ap[k, 0]),
                "ant2": int(ap[k, 1]),
                "chan_lo": lo,
                "chan_hi": lo + width - 1,
                "sigma": float(np.exp(rng.uniform(np.log(5.0), np.log(50.0)))),
            }
        )
    return {
        "channels": channels,
        "channel_sigma": [float(np.exp(rng.uniform(np.log(5.0), np.log(100.0)))) for _ in channels],
        "burst_times": bursts,
        "burst_sigma": [float(np.exp(rng.uniform(np.log(3.0), np.log(30.0)))) for _ in bursts],
        "baselines": baselines,
    }


def _subband_rfi(
    plan: dict[str, Any],
    sb: int,
    nch: int,
    n_times: int,
    sigma: float,
    rng: np.random.Generator,
    ap_cross: np.ndarray,
) -> np.ndarray:
    """The interference (Nt, Ncross, nch) added to one subband's cross-correlations (both
    polarisations alike): random phases, amplitudes scattered 30 % about the plan's."""
    out = np.zeros((n_times, len(ap_cross), nch), dtype=complex)
    first = (N_SUBBANDS - 1 - sb) * nch  # ascending index of this subband's lowest channel

    def file_channel(chan: int) -> int | None:  # the subband's channels descend
        k = first + nch - 1 - chan
        return k if 0 <= k < nch else None

    def noise_like(shape: tuple[int, ...], level: float) -> np.ndarray:
        amp = level * sigma * np.abs(1.0 + 0.3 * rng.standard_normal(shape))
        return amp * np.exp(2j * math.pi * rng.random(shape))

    for chan, level in zip(plan["channels"], plan["channel_sigma"], strict=True):
        k = file_channel(chan)
        if k is not None:
            out[:, :, k] += noise_like((n_times, len(ap_cross)), level)
    for t, level in zip(plan["burst_times"], plan["burst_sigma"], strict=True):
        out[t] += noise_like((len(ap_cross), nch), level)
    for bl in plan["baselines"]:
        row = np.flatnonzero((ap_cross[:, 0] == bl["ant1"]) & (ap_cross[:, 1] == bl["ant2"]))
        ks = [
            k for c in range(bl["chan_lo"], bl["chan_hi"] + 1) if (k := file_channel(c)) is not None
        ]
        if len(row) and ks:
            out[:, row[0], ks] += noise_like((n_times, len(ks)), bl["sigma"])
    return out


def rfi_truth_mask(
    rfi: dict[str, Any],
    ant1: np.ndarray,
    ant2: np.ndarray,
    time_index: np.ndarray,
    n_chan: int,
) -> np.ndarray:
    """Which (row, channel) samples of a group got interference, for rows given by their
    antennas and time index (0 = the group's first integration); channels ascending.
    Autocorrelations never do."""
    mask = np.zeros((len(ant1), n_chan), dtype=bool)
    cross = ant1 != ant2
    channels = list(rfi.get("channels", []))
    if channels:
        mask[np.ix_(cross, channels)] = True
    for t in rfi.get("burst_times", []):
        mask[cross & (time_index == t)] = True
    for bl in rfi.get("baselines", []):
        rows = ((ant1 == bl["ant1"]) & (ant2 == bl["ant2"])) | (
            (ant1 == bl["ant2"]) & (ant2 == bl["ant1"])
        )
        mask[rows, bl["chan_lo"] : bl["chan_hi"] + 1] = True
    return mask


def _subband_visibilities(
    freqs: np.ndarray,
    sources: list[dict[str, float | str]],
    offsets_deg: np.ndarray,
    geo_m: np.ndarray,
    gains: np.ndarray,
    bp: np.ndarray,
    ap: np.ndarray,
    is_auto: np.ndarray,
    spec: SimulationSpec,
    power: np.ndarray,
    alive: np.ndarray,
) -> np.ndarray:
    """Corrupted, noiseless visibilities (Nt, Nbl, Nf, 2 pols) of one subband. ``power``:
    each antenna's system power (1 for a working one); ``alive``: 0 where it sees no sky."""
    nt, nbl = geo_m.shape[0], geo_m.shape[1]
    sky = np.zeros((nt, nbl, len(freqs)), dtype=complex)
    beam = _gaussian_beam(offsets_deg, freqs, spec.dish_diameter_m) if sources else None
    for k, s in enumerate(sources):
        flux = float(s["flux_jy_1p4ghz"]) * (freqs / 1.4e9) ** float(s["spectral_index"])
        apparent = flux * beam[k]  # type: ignore[index]
        sky += apparent[None, None, :] * np.exp(
            2j * math.pi * geo_m[:, :, k, None] * freqs[None, None, :] / C_M_S
        )
    total_flux = sky[:, is_auto].real.mean() if is_auto.any() else 0.0
    data = np.zeros((nt, nbl, len(freqs), 2), dtype=complex)
    live = (alive[ap[:, 0]] * alive[ap[:, 1]])[None, :, None]
    auto_power = (spec.sefd_jy * power[ap[:, 0]] + total_flux * alive[ap[:, 0]])[None, :, None]
    for pol in range(2):
        gi = gains[:, ap[:, 0], pol][..., None] * bp[ap[:, 0], pol][None]
        gj = gains[:, ap[:, 1], pol][..., None] * bp[ap[:, 1], pol][None]
        d = gi * np.conj(gj) * sky * live
        # Autocorrelations: |g|^2 (SEFD x power + sky), real.
        d[:, is_auto] = (np.abs(gi[:, is_auto]) ** 2) * auto_power[:, is_auto]
        data[..., pol] = d
    return data


def _apply_fault(
    fault: Fault, path: Path, uvd: object, start: datetime, rng: np.random.Generator
) -> None:
    if fault.kind == "truncate":
        size = path.stat().st_size
        with path.open("r+b") as fh:
            fh.truncate(size // 2)
    elif fault.kind == "garbage":
        path.write_bytes(rng.bytes(4096))
    elif fault.kind in ("nan_vis", "nan_some_vis", "nan_uvw"):
        import h5py

        with h5py.File(path, "r+") as fh:
            if fault.kind == "nan_uvw":
                uvw = fh["Header/uvw_array"]
                values = uvw[()]
                values[::10] = np.nan
                uvw[...] = values
            else:
                vis = fh["Data/visdata"]
                values = vis[()]
                if fault.kind == "nan_vis":
                    values[...] = np.nan
                else:
                    pick = rng.random(values.shape)
                    values[pick < 0.02] = np.nan
                    values[(pick >= 0.02) & (pick < 0.03)] = np.inf
                vis[...] = values
    elif fault.kind == "duplicate":
        for extra_s in (5, 7):  # a name that differs from the original's
            stamp = (start + timedelta(seconds=extra_s)).strftime("%Y-%m-%dT%H:%M:%S")
            dup = path.with_name(f"{stamp}_sb{fault.subband:02d}.hdf5")
            if dup != path:
                break
        uvd.write_uvh5(str(dup), clobber=True)  # type: ignore[attr-defined]
