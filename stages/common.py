"""Helpers shared by the casa6 stage workers: band plan, Measurement Set inspection, disk."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stages.protocol import StageFailure

N_SUBBANDS = 16
BAND_LOW_HZ = 1311.25e6
BAND_HIGH_HZ = 1498.75e6
SUBBAND_WIDTH_HZ = (BAND_HIGH_HZ - BAND_LOW_HZ) / N_SUBBANDS
C_M_S = 299_792_458.0
PB_FWHM_FACTOR = 1.03  # Airy main lobe: FWHM = 1.03 lambda / D
REQUIRED_MS_COLUMNS = ("DATA", "UVW", "ANTENNA1", "ANTENNA2", "TIME", "FLAG")


# errno values that say the storage failed (a FUSE or network mount, a disk), not the data:
# EIO, ESTALE, ENOTCONN, EHOSTDOWN, EHOSTUNREACH, ETIMEDOUT, ENODEV, ENXIO.
STORAGE_ERRNOS = frozenset({5, 116, 107, 112, 113, 110, 19, 6})


def storage_failed(exc: BaseException) -> bool:
    """True when ``exc`` (an OSError, or HDF5's wrapping of one, which keeps only the text)
    is an I/O error of the storage rather than a defect of the file."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    text = str(exc)
    return any(f"errno = {n}," in text or os.strerror(n) in text for n in STORAGE_ERRNOS)


def quiet_astropy() -> None:
    """Offline machines: never try to download IERS tables; silence the noise about it."""
    warnings.filterwarnings("ignore", message=".*dubious year.*")
    warnings.filterwarnings("ignore", message=".*leap-second.*")
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None


def ordered_subband_files(request: dict[str, Any], *, skip: set[int] = frozenset()) -> list[str]:
    """The group's files in ascending frequency order (sb15 ... sb00); all 16 required
    (``skip``: subbands preflight dropped for damage, left out of the result)."""
    files = {int(k): v for k, v in request["subband_files"].items()}
    missing = sorted(set(range(N_SUBBANDS)) - set(files))
    if missing:
        raise StageFailure(
            "validation",
            "missing_subbands",
            f"group {request['group_id']}: missing subbands "
            + ", ".join(f"sb{m:02d}" for m in missing),
            "the group cannot be converted without every subband",
        )
    return [files[sb] for sb in sorted(files, reverse=True) if sb not in skip]


def committed_ms(request: dict[str, Any]) -> Path:
    """The group's Measurement Set as committed by convert; fatal if it is gone."""
    ms = Path(request["artifacts"]["ms"])
    if not ms.exists():
        raise StageFailure(
            "fatal",
            "missing_input",
            f"MS {ms} does not exist",
            "the convert product is gone: `requeue GROUP --from-stage convert`",
        )
    return ms


def ms_name(group_id: str) -> str:
    """A file-system and CASA friendly MS name (no colons)."""
    return group_id.replace(":", "-") + ".ms"


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def inspect_ms(ms: Path, *, data_column: str = "DATA", sample_rows: int = 20_000) -> dict:
    """Structural facts of a Measurement Set, read with python-casacore.

    Returns rows, columns, channel frequencies (ascending?), antenna names, flagged
    fraction (over all rows) and whether ``data_column`` holds non-zero unflagged data.
    """
    from casacore.tables import table

    out: dict[str, Any] = {}
    with table(str(ms), readonly=True, ack=False) as t:
        out["rows"] = t.nrows()
        out["columns"] = t.colnames()
        missing = [c for c in REQUIRED_MS_COLUMNS if c not in out["columns"]]
        out["missing_columns"] = missing
        if out["rows"] and not missing:
            # Autocorrelations are flagged on purpose before calibration: judge flags and
            # data on the cross-correlations only.
            a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
            cross = a1 != a2
            out["cross_rows"] = int(cross.sum())
            flags = t.getcol("FLAG")[cross]
            out["flagged_fraction"] = float(flags.mean()) if flags.size else 1.0
            if data_column in out["columns"] and cross.any():
                # Every k-th row, about sample_rows spread over the whole MS (reading a
                # multi-GB column whole doubled a worker's peak memory).
                step = max(1, out["rows"] // sample_rows)
                if not cross[::step].any():  # the stride hit only autocorrelations
                    step = 1
                n = min(out["rows"], (out["rows"] + step - 1) // step, sample_rows * 2)
                picked = cross[::step][:n]
                data = t.getcol(data_column, 0, n, step)[picked]
                good = ~t.getcol("FLAG", 0, n, step)[picked]
                out[f"{data_column.lower()}_nonzero_fraction"] = (
                    float(np.count_nonzero(data[good]) / good.sum()) if good.any() else 0.0
                )
    with table(str(ms / "SPECTRAL_WINDOW"), readonly=True, ack=False) as spw:
        freqs = [spw.getcell("CHAN_FREQ", i) for i in range(spw.nrows())]
        widths = [spw.getcell("CHAN_WIDTH", i) for i in range(spw.nrows())]
    allf = np.concatenate(freqs) if freqs else np.array([])
    out["n_spw"] = len(freqs)
    out["n_chan"] = int(allf.size)
    out["freq_min_hz"] = float(allf.min()) if allf.size else math.nan
    out["freq_max_hz"] = float(allf.max()) if allf.size else math.nan
    out["ascending"] = bool(allf.size and np.all(np.diff(allf) > 0))
    out["positive_widths"] = bool(all(np.all(np.asarray(w) > 0) for w in widths))
    with table(str(ms / "ANTENNA"), readonly=True, ack=False) as ant:
        out["antennas"] = list(ant.getcol("NAME"))
        out["antenna_positions_m"] = ant.getcol("POSITION").tolist()
    with table(str(ms / "OBSERVATION"), readonly=True, ack=False) as obs:
        out["telescope_name"] = str(obs.getcol("TELESCOPE_NAME")[0])
    return out


def cell_arcsec(ms: Path, facts: dict[str, Any]) -> tuple[float, float]:
    """Image cell = 1/(5 u_max) at the top of the band (5 pixels across the synthesized
    beam); returns (cell in arcsec, u_max in wavelengths)."""
    from casacore.tables import table

    with table(str(ms), readonly=True, ack=False) as t:
        uvw = t.getcol("UVW")
    umax = float(np.sqrt(uvw[:, 0] ** 2 + uvw[:, 1] ** 2).max()) * facts["freq_max_hz"] / C_M_S
    return float(np.round(np.degrees(1.0 / umax / 5.0) * 3600.0, 2)), umax


def sigma_theory_jy(ms: Path, sefd_jy: float) -> dict[str, float]:
    """Radiometer-equation Stokes I image noise (natural weighting) from the MS's actual
    unflagged cross-correlation samples: SEFD / sqrt(2 sum(dnu tau)) over XX and YY."""
    from casacore.tables import table

    with table(str(ms), readonly=True, ack=False) as t:
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        flags = t.getcol("FLAG")  # (rows, chan, pol)
        exposure = t.getcol("EXPOSURE")
        ddid = t.getcol("DATA_DESC_ID")
    with table(str(ms / "DATA_DESCRIPTION"), readonly=True, ack=False) as dd:
        spw_of_dd = dd.getcol("SPECTRAL_WINDOW_ID")
    with table(str(ms / "SPECTRAL_WINDOW"), readonly=True, ack=False) as spw:
        widths = [np.abs(spw.getcell("CHAN_WIDTH", i)) for i in range(spw.nrows())]
    cross = a1 != a2
    total = 0.0
    for d in np.unique(ddid):
        rows = cross & (ddid == d)
        width = widths[spw_of_dd[d]]  # (chan,)
        good = ~flags[rows]  # (r, chan, pol)
        npol = good.shape[2]
        use = good[:, :, [0, npol - 1]] if npol > 2 else good  # XX and YY
        total += float(np.einsum("rcp,c,r->", use.astype(float), width, exposure[rows]))
    sigma = sefd_jy / math.sqrt(2.0 * total) if total > 0 else math.inf
    return {"sigma_theory_jy": sigma, "unflagged_bandwidth_time_hz_s": total}


def set_telescope_name(ms: Path, casa_name: str, identity: str) -> None:
    """Record a telescope name CASA knows (its Observatories table has no DSA-110) and keep
    the real identity as a keyword of the OBSERVATION table."""
    from casacore.tables import table

    with table(str(ms / "OBSERVATION"), readonly=False, ack=False) as obs:
        obs.putcol("TELESCOPE_NAME", [casa_name] * obs.nrows())
        obs.putkeyword("CONTIMG_TELESCOPE_IDENTITY", identity)


def move_tree(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (rename when on one filesystem; copy+remove across them)."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV
            raise
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(src)


def release_freed_memory() -> None:
    """Give memory freed by Python back to the system (glibc's malloc_trim): after reading
    16 subbands one by one, glibc keeps their freed buffers in the heap (its mmap threshold
    rises after the first large frees), which counts in the worker's RSS and in the memory
    the supervisor sees it use. No-op where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return


def apparent_spectrum(src: dict[str, Any], freqs_hz: np.ndarray, dish_m: float) -> np.ndarray:
    """Flux density (Jy) of catalogue source ``src`` as the array sees it at ``freqs_hz``:
    S0 (nu / 1.4 GHz)^alpha times the Gaussian primary beam at its offset, whose width
    scales as 1/nu (so an off-centre source looks steeper than it is)."""
    fwhm_deg = np.degrees(PB_FWHM_FACTOR * C_M_S / freqs_hz / dish_m)
    beam = np.exp(-4.0 * math.log(2.0) * (float(src.get("offset_deg", 0.0)) / fwhm_deg) ** 2)
    intrinsic = float(src["flux_jy_1p4ghz"]) * (freqs_hz / 1.4e9) ** float(src["spectral_index"])
    return intrinsic * beam
