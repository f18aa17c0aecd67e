"""Image: the whole primary beam (a fixed field, 3.5 deg by default) of CORRECTED_DATA with
WSClean, or tclean where WSClean is missing or failed; the cell from the uv coverage,
channel averaging bounded by the smearing it causes, the threshold from the radiometer
equation. Products: a flat-noise FITS image, a primary-beam-corrected one, a PNG preview
on sky coordinates, and the QA numbers the image gate judges (rms vs theory, peak,
dynamic range, beam, calibrator flux), the same whichever imager made them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages import source_finding
from stages.common import C_M_S, committed_ms, inspect_ms, sigma_theory_jy
from stages.imaging_geometry import FieldGeometry, plan_field
from stages.protocol import StageFailure, run
from stages.tclean_imager import run_tclean
from stages.wsclean_imager import CleanSettings, ImagerRun, find_wsclean, run_wsclean

PB_FWHM_FACTOR = 1.03
SIDEREAL_DEG_PER_S = 360.98564736629 / 86400.0
PB_CUTOFF = 0.1  # the primary-beam-corrected image is blanked where the beam is below this
PB_SAMPLES = 24  # beam positions averaged over the group (one per integration)
SOURCES_CSV = "sources.csv"


def stage(request: dict[str, Any]) -> dict[str, Any]:
    params = request["tier"]["params"]
    ms = committed_ms(request)
    facts = inspect_ms(ms, data_column="CORRECTED_DATA")
    if "CORRECTED_DATA" not in facts["columns"]:
        raise StageFailure(
            "fatal",
            "not_calibrated",
            f"{ms} has no CORRECTED_DATA",
            "never image uncalibrated data: `requeue --from-stage calibrate`",
        )
    if facts["flagged_fraction"] >= 0.999:
        raise StageFailure(
            "validation",
            "all_flagged",
            f"{ms}: nothing unflagged to image",
            "the group holds no usable data; quarantined",
        )
    imager, wsclean, imager_note = _choose_imager(params)
    sefd = float(request["telescope"]["sefd_jy"])
    theory = sigma_theory_jy(ms, sefd)
    sigma = theory["sigma_theory_jy"]
    geometry = _geometry(ms, facts, params)
    out = Path(request["output_dir"])
    scratch = out / "scratch"
    threads = int(request.get("threads") or os.cpu_count() or 1)
    nsigma = float(params.get("threshold_nsigma", 3.0))
    robust = float(params.get("robust", 0.0))
    is_calibrator_field = bool(request.get("calibrator_source"))
    t = time.monotonic()
    vis, data_column, average_s = _average_channels(ms, scratch, geometry, params)
    default_niter = 20000 if imager == "wsclean" else 3000  # a cap: the threshold stops CLEAN
    clean = CleanSettings(
        data_column=data_column,
        threshold_jy=nsigma * sigma,
        niter=int(params.get("niter", default_niter)),
        robust=robust,
    )
    if imager == "wsclean":
        assert wsclean is not None
        result = run_wsclean(
            wsclean,
            vis,
            scratch / "wsclean",
            geometry,
            clean,
            spectral_terms=2 if is_calibrator_field else 1,
            threads=threads,
            memory_gb=float(params.get("memory_gb", 0.0)),
            timeout_s=float(params.get("wsclean_timeout_s", 3000.0)),
        )
        settings: dict[str, Any] = {"spectral_terms": 2 if is_calibrator_field else 1}
    else:
        deconvolver = str(params.get("deconvolver", "auto"))
        if deconvolver == "auto":
            deconvolver = "mtmfs" if is_calibrator_field else "hogbom"
        cyclefactor = float(params.get("cyclefactor", 3.0))
        result = run_tclean(
            vis,
            scratch / "tclean",
            geometry,
            clean,
            deconvolver=deconvolver,
            cyclefactor=cyclefactor,
        )
        settings = {"deconvolver": deconvolver, "cyclefactor": cyclefactor}
    fits = out / "image.fits"
    shutil.move(result.image_fits, fits)
    psf = out / "psf.fits"
    shutil.move(result.psf_fits, psf)
    _fix_obsgeo(fits, facts)
    qa = _measure(fits, psf, result, request, sigma, geometry.cell_arcsec)
    pbcor = out / "image.pbcor.fits"
    pb_info = _primary_beam_correct(fits, pbcor, request)
    png = out / "image.png"
    _preview(fits, png, request["group_id"], qa, imager)
    catalogue = _source_catalogue(fits, out, scratch, request, qa, params)
    shutil.rmtree(scratch, ignore_errors=True)
    metrics = {
        **qa,
        **pb_info,
        "imager": imager,
        "imager_version": result.version,
        "imager_note": imager_note,
        "imager_s": round(result.seconds, 2),
        "image_total_s": round(time.monotonic() - t, 2),
        "channel_average_s": round(average_s, 2),
        "major_cycles": result.major_cycles,
        "clean_iterations": result.iterations,
        "threads": threads,
        "threshold_nsigma": nsigma,
        "robust": robust,
        **settings,
        **geometry.as_metrics(),
        **theory,
        **catalogue,
    }
    artifacts = [
        {"path": "image.fits", "kind": "image_fits"},
        {"path": "image.pbcor.fits", "kind": "image_pbcor_fits"},
        {"path": "image.png", "kind": "image_png"},
        {"path": "psf.fits", "kind": "psf_fits"},
    ]
    if (out / SOURCES_CSV).exists():
        artifacts.append({"path": SOURCES_CSV, "kind": "source_catalogue"})
    return {
        "artifacts": artifacts,
        "metrics": metrics,
        "qa": qa,
    }


def _source_catalogue(
    fits: Path,
    out: Path,
    scratch: Path,
    request: dict[str, Any],
    qa: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """PyBDSF's catalogue of the flat-noise image as ``sources.csv``, and (with a sky
    catalogue configured) its comparison with the catalogue. A finder that fails leaves the
    image standing: the error is recorded and the image gate warns on it."""
    from astropy.io import fits as pyfits
    from astropy.wcs import WCS

    thresh_pix = float(params.get("source_thresh_pix", 5.0))
    thresh_isl = float(params.get("source_thresh_isl", 3.0))
    t = time.monotonic()
    # PyBDSF writes its log beside the image it reads: give it a link in the scratch area.
    link = scratch / "bdsf" / fits.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(fits.resolve())
    try:
        import bdsf

        found = source_finding.find_sources(link, link.parent, thresh_pix, thresh_isl)
    except Exception as exc:  # noqa: BLE001 - PyBDSF raises anything from a bad fit to numpy
        return {
            "source_finder": "pybdsf",
            "source_finder_error": f"{type(exc).__name__}: {exc}"[:300],
        }
    source_finding.write_catalogue(
        out / SOURCES_CSV,
        found,
        {
            "image": fits.name,
            "finder": f"PyBDSF {bdsf.__version__}",
            "thresh_pix_sigma": thresh_pix,
            "thresh_isl_sigma": thresh_isl,
            "reffreq_hz": qa.get("reffreq_hz"),
        },
    )
    metrics: dict[str, Any] = {
        "source_finder": f"pybdsf {bdsf.__version__}",
        "source_finder_s": round(time.monotonic() - t, 2),
        "sources_found": len(found),
    }
    reference = request.get("reference_sources")
    if reference is None:
        metrics["catalogue_comparison"] = "no sky catalogue configured"
        return metrics
    with pyfits.open(fits) as hdul:
        header = hdul[0].header
    wcs = WCS(header).celestial
    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])

    def in_field(ra: float, dec: float) -> bool:
        x, y = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
        return 0 <= x < nx and 0 <= y < ny

    beam = float(qa.get("beam_major_arcsec") or 0.0)
    metrics.update(
        source_finding.compare(
            found,
            reference,
            freq_hz=float(qa["reffreq_hz"]),
            dish_m=float(request["telescope"]["dish_diameter_m"]),
            rms_jy=float(qa["rms_jy"]),
            match_radius_arcsec=max(beam, 3.0 * float(header["CDELT2"]) * 3600.0),
            in_field=in_field,
        )
    )
    return metrics


def _choose_imager(params: dict[str, Any]) -> tuple[str, str | None, str]:
    """(imager, wsclean path, why). ``imager``: auto (WSClean where installed, else
    tclean), wsclean (required: its absence is this tier's failure) or tclean."""
    wanted = str(params.get("imager", "auto"))
    if wanted == "tclean":
        return "tclean", None, "tclean requested by the tier"
    binary = find_wsclean(params.get("wsclean"))
    if binary is not None:
        return "wsclean", binary, f"wsclean at {binary}"
    if wanted == "wsclean":
        raise StageFailure(
            "recoverable",
            "imager_unavailable",
            f"wsclean not found ({params.get('wsclean') or 'wsclean on PATH'})",
            "install wsclean (Debian package wsclean); the tclean tier is tried",
        )
    return "tclean", None, f"wsclean not found ({params.get('wsclean') or 'PATH'}): tclean"


def _geometry(ms: Path, facts: dict[str, Any], params: dict[str, Any]) -> FieldGeometry:
    from casacore.tables import table

    with table(str(ms), readonly=True, ack=False) as t:
        uvw = t.getcol("UVW")
        interval = float(np.median(t.getcol("INTERVAL")))
    with table(str(ms / "SPECTRAL_WINDOW"), readonly=True, ack=False) as spw:
        widths = np.abs(np.concatenate([spw.getcell("CHAN_WIDTH", i) for i in range(spw.nrows())]))
        per_spw = min(int(spw.getcell("NUM_CHAN", i)) for i in range(spw.nrows()))
    umax = float(np.sqrt(uvw[:, 0] ** 2 + uvw[:, 1] ** 2).max()) * facts["freq_max_hz"] / C_M_S
    if not math.isfinite(umax) or umax <= 0:
        raise StageFailure(
            "validation",
            "no_baselines",
            f"{ms}: no baseline has a non-zero uv length",
            "the group holds no usable cross-correlations",
        )
    return plan_field(
        umax_lambda=umax,
        freq_min_hz=facts["freq_min_hz"],
        channel_width_hz=float(np.median(widths)),
        channels_per_spw=per_spw,
        integration_s=interval,
        field_deg=float(params.get("field_deg", 3.5)),
        pixels_per_beam=float(params.get("pixels_per_beam", 4.0)),
        smearing_loss_limit=float(params.get("smearing_loss_limit", 0.05)),
        max_imsize=int(params.get("max_imsize", 8192)),
    )


def _average_channels(
    ms: Path, scratch: Path, geometry: FieldGeometry, params: dict[str, Any]
) -> tuple[Path, str, float]:
    """The visibilities to image: the committed MS's CORRECTED_DATA, or (when the
    smearing budget allows averaging and the tier asks for it) a channel-averaged copy in
    the attempt's scratch directory, which is never a product."""
    if geometry.chan_avg <= 1 or not params.get("average_channels", True):
        return ms, "CORRECTED_DATA", 0.0
    import casatasks as ct

    scratch.mkdir(parents=True, exist_ok=True)
    averaged = scratch / "averaged.ms"
    t = time.monotonic()
    ct.mstransform(
        vis=str(ms),
        outputvis=str(averaged),
        datacolumn="corrected",
        chanaverage=True,
        chanbin=geometry.chan_avg,
        keepflags=True,
    )
    if not averaged.exists():
        raise StageFailure(
            "retryable",
            "average_failed",
            f"mstransform wrote no channel-averaged copy of {ms}",
            "see the CASA log",
        )
    return averaged, "DATA", time.monotonic() - t


def _measure(
    fits: Path,
    psf: Path,
    result: ImagerRun,
    request: dict[str, Any],
    sigma: float,
    cell: float,
) -> dict[str, Any]:
    """QA from the FITS products (so both imagers are judged by the same code)."""
    from astropy.io import fits as pyfits
    from astropy.wcs import WCS

    header = pyfits.getheader(fits)
    pix = np.squeeze(pyfits.getdata(fits)).astype(np.float64)  # (dec, ra)
    psf_peak = float(np.nanmax(pyfits.getdata(psf)))
    finite = bool(np.all(np.isfinite(pix)))
    if not finite or psf_peak <= 0 or result.weight_sum <= 0:
        raise StageFailure(
            "validation",
            "blank_image",
            f"image {fits.name} unusable: finite={finite}, psf peak={psf_peak}, "
            f"gridded weight={result.weight_sum}",
            "no usable visibilities reached the imager",
        )
    bmaj, bmin = float(header["BMAJ"]) * 3600.0, float(header["BMIN"]) * 3600.0
    reffreq = _reffreq(header)
    wcs = WCS(header).celestial
    centre_deg = (float(header["CRVAL1"]), float(header["CRVAL2"]))
    peak = float(pix.max())
    # Off-source noise: robust (MAD) rms outside 3 beams of every pixel above 5 x MAD rms.
    mad = 1.4826 * float(np.median(np.abs(pix - np.median(pix))))
    bright = pix > 5 * mad
    # 3 beams, but never more than a quarter of the image: a co-linear array's beam can be
    # 100 000" long (a flagged N-S arm), and the mask is then only a rough exclusion.
    radius = min(int(math.ceil(3 * bmaj / cell)), max(1, min(pix.shape) // 4))
    mask = ~_dilate(bright, radius)
    off = pix[mask] if mask.sum() > 100 else pix.ravel()
    rms = float(1.4826 * np.median(np.abs(off - np.median(off))))
    qa: dict[str, Any] = {
        "peak_jy": peak,
        "rms_jy": rms,
        "dynamic_range": peak / rms if rms > 0 else math.inf,
        "rms_over_theory": rms / sigma if sigma > 0 else math.inf,
        "beam_major_arcsec": bmaj,
        "beam_minor_arcsec": bmin,
        "beam_pa_deg": float(header.get("BPA", 0.0)),
        "beam_axis_ratio": bmaj / bmin if bmin > 0 else None,
        "psf_peak": psf_peak,
        "gridded_weight": result.weight_sum,
        "reffreq_hz": reffreq,
        "image_finite": finite,
        "phase_centre_rad": [math.radians(centre_deg[0]), math.radians(centre_deg[1])],
    }
    cal = request.get("calibrator_source")
    if cal:
        px, py = (float(v) for v in wcs.world_to_pixel_values(cal["ra_deg"], cal["dec_deg"]))
        ix, iy = int(round(px)), int(round(py))
        r = max(2, int(round(0.5 * bmin / cell)))
        if 0 <= ix < pix.shape[1] and 0 <= iy < pix.shape[0]:
            box = pix[max(0, iy - r) : iy + r + 1, max(0, ix - r) : ix + r + 1]
            offset_deg = _sep_deg(cal["ra_deg"], cal["dec_deg"], *centre_deg)
            beam_gain = _gaussian_beam(offset_deg, reffreq, request)
            expected = cal["flux_jy_1p4ghz"] * (reffreq / 1.4e9) ** cal["spectral_index"]
            measured, method = _fitted_flux(fits, ix, iy, r * 4)
            if measured is None:
                measured, method = float(box.max()), "peak_pixel"
            qa.update(
                calibrator=cal["name"],
                calibrator_expected_jy=expected * beam_gain,
                calibrator_measured_jy=measured,
                calibrator_flux_ratio=measured / (expected * beam_gain),
                calibrator_flux_method=method,
            )
    return qa


def _reffreq(header: Any) -> float:
    for axis in range(3, int(header.get("NAXIS", 2)) + 1):
        if str(header.get(f"CTYPE{axis}", "")).startswith("FREQ"):
            return float(header[f"CRVAL{axis}"])
    raise StageFailure("fatal", "no_frequency_axis", "the image has no FREQ axis", "imager bug")


def _gaussian_beam(offset_deg: Any, freq_hz: float, request: dict[str, Any]) -> Any:
    """The primary beam's power gain: a Gaussian of FWHM 1.03 lambda / D (the Airy main
    lobe; the same model the calibration and the simulator use)."""
    dish = float(request["telescope"]["dish_diameter_m"])
    fwhm_deg = math.degrees(PB_FWHM_FACTOR * C_M_S / freq_hz / dish)
    return np.exp(-4 * math.log(2) * (np.asarray(offset_deg) / fwhm_deg) ** 2)


def _primary_beam_correct(fits: Path, out: Path, request: dict[str, Any]) -> dict[str, Any]:
    """image / beam, blanked (NaN) where the beam is below ``PB_CUTOFF``. A drift scan
    moves the sky through a fixed beam: the effective beam of the group is the average of
    the beam over its duration, centred at each moment on the meridian at the pointing
    declination (the phase centre is the meridian at mid-group). Computed on a coarse grid
    (the beam is smooth on scales of degrees) and interpolated to every pixel."""
    from astropy.io import fits as pyfits
    from astropy.wcs import WCS
    from scipy.interpolate import RectBivariateSpline

    with pyfits.open(fits) as hdul:
        header = hdul[0].header.copy()
        data = np.array(hdul[0].data, dtype=np.float32)
    wcs = WCS(header).celestial
    ny, nx = data.shape[-2:]
    yc = np.linspace(0, ny - 1, min(ny, 129))
    xc = np.linspace(0, nx - 1, min(nx, 129))
    xs, ys = np.meshgrid(xc, yc)
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    ra0, dec0 = float(header["CRVAL1"]), float(header["CRVAL2"])
    duration = float(request.get("obs_duration_s") or 309.0)
    freq = _reffreq(header)
    beam = np.zeros_like(ra, dtype=np.float64)
    offsets_s = (np.arange(PB_SAMPLES) + 0.5) / PB_SAMPLES * duration - duration / 2
    for dt in offsets_s:
        centre_ra = ra0 + SIDEREAL_DEG_PER_S * dt
        beam += _gaussian_beam(_sep_deg_array(ra, dec, centre_ra, dec0), freq, request)
    beam /= PB_SAMPLES
    spline = RectBivariateSpline(yc, xc, beam, kx=1, ky=1)
    full = spline(np.arange(ny), np.arange(nx)).astype(np.float32)
    plane = data.reshape(-1, ny, nx)
    corrected = np.where(full >= PB_CUTOFF, plane / np.maximum(full, PB_CUTOFF), np.nan)
    header["HISTORY"] = (
        f"contimg: divided by the drift-averaged Gaussian primary beam ({PB_SAMPLES} samples "
        f"over {duration:.0f} s), blanked below {PB_CUTOFF}"
    )
    pyfits.writeto(out, corrected.reshape(data.shape).astype(np.float32), header, overwrite=True)
    return {
        "pb_model": "gaussian_1.03_lambda_over_d_drift_averaged",
        "pb_cutoff": PB_CUTOFF,
        "pb_min_in_field": float(full.min()),
        "pb_blanked_fraction": float(np.mean(full < PB_CUTOFF)),
    }


def _fix_obsgeo(fits: Path, facts: dict[str, Any]) -> None:
    """CASA's exportfits writes OBSGEO-X/Y/Z as the observatory's (lon, lat, height) taken
    for Cartesian metres; write the array centre's ITRF XYZ (whichever imager wrote it)."""
    from astropy.io import fits as pyfits

    centre = np.mean(np.asarray(facts["antenna_positions_m"]), axis=0)
    with pyfits.open(fits, mode="update") as hdul:
        for axis, value in zip("XYZ", centre, strict=True):
            hdul[0].header[f"OBSGEO-{axis}"] = (float(value), "[m] array centre, ITRF")


def _fitted_flux(image_path: Path, ix: int, iy: int, half: int) -> tuple[float | None, str]:
    """Integrated flux (Jy) of a Gaussian fitted around pixel (ix, iy): unlike the peak
    pixel, it does not lose up to ~6 % when the source sits between pixel centres."""
    from casatools import image

    ia = image()
    try:
        ia.open(str(image_path))
        fit = ia.fitcomponents(box=f"{ix - half},{iy - half},{ix + half},{iy + half}")
        if not bool(np.all(fit.get("converged", [False]))):
            return None, "fit_not_converged"
        return float(fit["results"]["component0"]["flux"]["value"][0]), "gaussian_fit"
    except Exception:  # noqa: BLE001 - the peak pixel is the fallback
        return None, "fit_failed"
    finally:
        ia.close()


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a disc of ``radius`` pixels, through the Euclidean distance
    transform: memory and time are the image's, whatever the radius (a structuring
    element of radius r costs r^2)."""
    from scipy.ndimage import distance_transform_edt

    if radius <= 0 or not mask.any():
        return mask
    return distance_transform_edt(~mask) <= radius


def _sep_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    return float(_sep_deg_array(np.asarray(ra1), np.asarray(dec1), ra2, dec2))


def _sep_deg_array(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    r1, d1 = np.radians(ra), np.radians(dec)
    r0, d0 = math.radians(ra0), math.radians(dec0)
    c = np.sin(d1) * math.sin(d0) + np.cos(d1) * math.cos(d0) * np.cos(r1 - r0)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _preview(fits: Path, png: Path, group_id: str, qa: dict[str, Any], imager: str) -> None:
    """A PNG on sky coordinates (RA/Dec axes from the FITS WCS) with the restoring beam
    drawn in the lower-left corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.io import fits as pyfits
    from astropy.visualization import AsinhStretch, ImageNormalize
    from astropy.wcs import WCS
    from matplotlib.patches import Ellipse

    header = pyfits.getheader(fits)
    data = np.squeeze(pyfits.getdata(fits))
    wcs = WCS(header).celestial
    rms = qa["rms_jy"]
    fig = plt.figure(figsize=(7, 6.3), dpi=110)
    ax = fig.add_subplot(projection=wcs)
    # asinh: linear near the noise, logarithmic above, so that a 15 Jy calibrator and
    # 10 mJy sources show in one preview.
    vmin, vmax = -3 * rms, max(20 * rms, 0.5 * qa["peak_jy"])
    linear_to = min(0.1, max(1e-4, 10 * rms / (vmax - vmin)))  # ~10 sigma, as a fraction
    norm = ImageNormalize(vmin=vmin * 1e3, vmax=vmax * 1e3, stretch=AsinhStretch(a=linear_to))
    shown = ax.imshow(data * 1e3, origin="lower", cmap="inferno", norm=norm)
    fig.colorbar(shown, ax=ax, label="mJy/beam", shrink=0.85)
    ax.coords[0].set_axislabel("RA (J2000)")
    ax.coords[1].set_axislabel("Dec (J2000)")
    ax.coords[0].set_major_formatter("hh:mm")
    ax.coords[1].set_major_formatter("dd:mm")
    ax.coords.grid(color="white", alpha=0.25, linestyle=":")
    cell = abs(float(header["CDELT2"])) * 3600.0
    bmaj, bmin = qa["beam_major_arcsec"] / cell, qa["beam_minor_arcsec"] / cell
    ny, nx = data.shape
    # Never let a pathological (co-linear array) beam cover the whole preview.
    scale = min(1.0, 0.15 * min(nx, ny) / max(bmaj, 1e-9))
    bmaj, bmin = bmaj * scale, bmin * scale
    pad = 0.05 * min(nx, ny) + bmaj / 2
    ax.add_patch(
        Ellipse(
            (pad, pad),
            width=bmin,
            height=bmaj,
            angle=qa["beam_pa_deg"],
            edgecolor="cyan",
            facecolor="none",
            linewidth=1.2,
        )
    )
    ax.set_title(
        f"DSA-110 {group_id} ({imager})\npeak {qa['peak_jy'] * 1e3:.1f} mJy, rms "
        f"{rms * 1e3:.2f} mJy, rms/theory {qa['rms_over_theory']:.2f}, beam "
        f'{qa["beam_major_arcsec"]:.0f}" x {qa["beam_minor_arcsec"]:.0f}"'
        + (" (not to scale)" if scale < 1 else ""),
        fontsize=8,
    )
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    run(stage)
