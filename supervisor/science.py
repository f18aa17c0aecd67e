"""Score the pipeline's products against the simulator's truth: what flagging caught of the
injected interference and broken antennas, how close the gains came to the injected ones,
and how well the images recover the sky. Used by ``make science`` and by the end-to-end
tests; never by the daemon (the telescope has no truth file).

Conventions: gains as in supervisor/simulate.py (CASA solves ``conj(g)``); fractions count
cross-correlation samples (row x channel) on working antennas.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supervisor.simulate import C_M_S, rfi_truth_mask


@dataclass(frozen=True)
class FlagAccuracy:
    """Flags of one Measurement Set against its group's injected interference.

    injected_flagged: fraction of the injected samples that are flagged (target >= 0.95);
    clean_lost: fraction of the clean samples that are flagged (target < 0.05); both on
    baselines between working antennas. dead_flagged / dead_injected: dead antennas whose
    every sample is flagged, of those injected; noisy_flagged likewise.
    """

    injected_flagged: float
    clean_lost: float
    injected_samples: int
    dead_flagged: int
    dead_injected: int
    noisy_flagged: int
    noisy_injected: int
    by_kind: dict[str, float]  # injected_flagged of channels / burst_times / baselines alone


def flag_accuracy(ms: Path, truth: dict[str, Any]) -> FlagAccuracy:
    """Compare the MS's FLAG column with ``truth['rfi']`` (a group's truth JSON)."""
    from casacore.tables import table

    with table(str(ms), readonly=True, ack=False) as t:
        ant1, ant2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        times = t.getcol("TIME")
        flags = t.getcol("FLAG").any(axis=2)  # (rows, chan)
    rfi = truth.get("rfi") or {}
    dead = [int(a) for a in rfi.get("dead_antennas", [])]
    noisy = [int(a) for a in rfi.get("noisy_antennas", [])]
    _, time_index = np.unique(times, return_inverse=True)
    injected = rfi_truth_mask(rfi, ant1, ant2, time_index, flags.shape[1])
    broken = dead + noisy
    working = (ant1 != ant2) & ~np.isin(ant1, broken) & ~np.isin(ant2, broken)
    inj, f = injected[working], flags[working]
    clean = ~inj

    by_kind = {}
    for kind in ("channels", "burst_times", "baselines"):
        alone = {k: (v if k == kind else []) for k, v in rfi.items()}
        sel = rfi_truth_mask(alone, ant1, ant2, time_index, flags.shape[1])[working]
        if sel.any():
            by_kind[kind] = float(f[sel].mean())

    def all_flagged(a: int) -> bool:
        rows = ((ant1 == a) | (ant2 == a)) & (ant1 != ant2)
        return bool(flags[rows].all())

    return FlagAccuracy(
        injected_flagged=float(f[inj].mean()) if inj.any() else math.nan,
        clean_lost=float(f[clean].mean()) if clean.any() else math.nan,
        injected_samples=int(inj.sum()),
        dead_flagged=sum(all_flagged(a) for a in dead),
        dead_injected=len(dead),
        noisy_flagged=sum(all_flagged(a) for a in noisy),
        noisy_injected=len(noisy),
        by_kind=by_kind,
    )


def read_table(path: Path) -> dict[str, np.ndarray]:
    from casacore.tables import table

    with table(str(path), readonly=True, ack=False) as t:
        out = {c: t.getcol(c) for c in ("TIME", "ANTENNA1", "CPARAM", "FLAG")}
    with table(str(path / "SPECTRAL_WINDOW"), readonly=True, ack=False) as spw:
        out["freqs"] = spw.getcell("CHAN_FREQ", 0)
    return out


def gain_errors(caldir: Path, truth_npz: Path, refant_index: int) -> dict[str, float]:
    """Recovered B(nu) x G against the injected conj(G(t_mid) B(nu)) (CASA convention),
    both referenced to the reference antenna's phase. Amplitude error in %, phase in deg."""
    truth = np.load(truth_npz)
    b = read_table(caldir / "B.bcal")
    g = read_table(caldir / "G.gcal")
    nant = truth["gains_casa"].shape[1]
    freqs = truth["freqs_hz"]
    assert np.allclose(b["freqs"], freqs, rtol=1e-9), "bandpass channels must be the truth's"
    # python-casacore: CPARAM is (row, chan, pol); one bandpass row per antenna.
    brec = np.full((nant, 2, len(freqs)), np.nan + 0j)
    for row, ant in enumerate(b["ANTENNA1"]):
        vals = np.where(b["FLAG"][row], np.nan, b["CPARAM"][row])  # (chan, pol)
        brec[ant] = vals.T
    grec = np.full((nant, 2), np.nan + 0j)
    for row, ant in enumerate(g["ANTENNA1"]):
        vals = np.where(g["FLAG"][row, 0], np.nan, g["CPARAM"][row, 0])
        grec[ant] = vals
    rec = brec * grec[:, :, None]
    mid = truth["gains_casa"].shape[0] // 2
    tru = truth["gains_casa"][mid][:, :, None] * truth["bandpass_casa"]

    def ref(x: np.ndarray) -> np.ndarray:
        r = x[refant_index : refant_index + 1]
        return x * np.conj(r) / np.abs(r)

    rr, tt = ref(rec), ref(tru)
    ok = np.isfinite(rr)
    amp = (np.abs(rr) / np.abs(tt) - 1)[ok]
    phase = np.degrees(np.angle(rr * np.conj(tt)))[ok]
    return {
        "amp_err_rms_pct": float(100 * np.sqrt(np.mean(amp**2))),
        "phase_err_rms_deg": float(np.sqrt(np.mean(phase**2))),
        "flagged_fraction": float(1 - ok.mean()),
    }


def measure_sources(fits_path: Path, truth_json: Path, dish_m: float = 4.65) -> list[dict]:
    """At each truth source, fit the restoring beam (shape fixed from BMAJ/BMIN/BPA; free
    amplitude and position) to the image: for a point source the amplitude in Jy/beam is its
    flux. Returns flux ratio (vs the expected apparent flux at the image's reference
    frequency, Gaussian primary beam) and the position offset in pixels."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from scipy.optimize import curve_fit

    truth: dict[str, Any] = json.loads(truth_json.read_text())
    with fits.open(fits_path) as hdul:
        header = hdul[0].header
        data = np.squeeze(hdul[0].data).astype(float)
    import warnings

    from astropy.wcs import FITSFixedWarning

    with warnings.catch_warnings():  # CASA's FITS headers get harmless MJD/OBSGEO fix-ups
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header).celestial
    reffreq = float(header["CRVAL3"] if "FREQ" in str(header.get("CTYPE3")) else header["CRVAL4"])
    pix_deg = abs(header["CDELT1"])
    sig_maj = header["BMAJ"] / pix_deg / (2 * math.sqrt(2 * math.log(2)))
    sig_min = header["BMIN"] / pix_deg / (2 * math.sqrt(2 * math.log(2)))
    bpa = math.radians(header["BPA"])  # from north through east
    east_x = -1.0 if header["CDELT1"] < 0 else 1.0
    major = np.array([east_x * math.sin(bpa), math.cos(bpa)])  # pixel (x, y) direction
    minor = np.array([-major[1], major[0]])
    fwhm_deg = math.degrees(1.03 * C_M_S / reffreq / dish_m)
    yy, xx = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
    out = []
    for src in truth["sources"]:
        px, py = (float(v) for v in wcs.world_to_pixel_values(src["ra_deg"], src["dec_deg"]))
        half = int(max(4, 1.2 * sig_maj * 2.355))
        ix, iy = int(round(px)), int(round(py))
        sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        cut, x, y = data[sl], xx[sl], yy[sl]

        def beam(xy, amp, x0, y0):  # noqa: ANN001, ANN202
            dx, dy = xy[0] - x0, xy[1] - y0
            a = dx * major[0] + dy * major[1]
            b = dx * minor[0] + dy * minor[1]
            return amp * np.exp(-0.5 * ((a / sig_maj) ** 2 + (b / sig_min) ** 2))

        # Fit the beam's core (within half a beam of the peak): the restored source is the
        # beam there, while residual sidelobes dominate further out.
        core = ((x - px) ** 2 + (y - py) ** 2) <= (1.2 * sig_min * 2.355 / 2) ** 2 + 2
        expected = src["flux_jy_1p4ghz"] * (reffreq / 1.4e9) ** src["spectral_index"]
        expected *= math.exp(-4 * math.log(2) * (src["offset_deg"] / fwhm_deg) ** 2)
        try:
            popt, _ = curve_fit(
                beam, (x[core], y[core]), cut[core], p0=[cut.max(), px, py], maxfev=20000
            )
        except (RuntimeError, ValueError, TypeError):  # no convergence, or off the image
            out.append({"name": src["name"], "expected_jy": expected, "fit_failed": True})
            continue
        amp, x0, y0 = popt
        out.append(
            {
                "name": src["name"],
                "expected_jy": expected,
                "measured_jy": float(amp),
                "ratio": float(amp / expected),
                "offset_pix": float(math.hypot(x0 - px, y0 - py)),
            }
        )
    return out
