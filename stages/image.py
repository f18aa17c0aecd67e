"""Image: tclean (MFS, Briggs; mtmfs nterms=2 on calibrator fields) of CORRECTED_DATA, with
a cell and size from the uv coverage and a threshold from the radiometer equation; exportfits,
a PNG preview, and the QA numbers the image gate judges (rms vs theory, peak, dynamic range,
beam, calibrator flux).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import C_M_S, cell_arcsec, committed_ms, inspect_ms, sigma_theory_jy
from stages.protocol import StageFailure, run

PB_FWHM_FACTOR = 1.03


def stage(request: dict[str, Any]) -> dict[str, Any]:
    import casatasks as ct

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
    sefd = float(request["telescope"]["sefd_jy"])
    theory = sigma_theory_jy(ms, sefd)
    sigma = theory["sigma_theory_jy"]
    cell, umax_lambda = cell_arcsec(ms, facts)
    imsize = int(params.get("imsize", 256))
    niter = int(params.get("niter", 3000))  # a cap: the threshold normally stops CLEAN
    # Shallow minor cycles: with the sparse T-array PSF, CLEAN on a bright calibrator
    # diverged at the default cyclefactor 1 (peak residual 0.07 -> 0.34 Jy over three major
    # cycles, rms/theory 17.5); cyclefactor 3 reached the threshold at rms/theory 0.96.
    cyclefactor = float(params.get("cyclefactor", 3.0))
    robust = float(params.get("robust", 0.0))
    nsigma = float(params.get("threshold_nsigma", 3.0))
    # mtmfs (nterms=2) models the spectral index a bright calibrator needs across the 13 %
    # band (hogbom's floor there is 4-9 mJy, REPORT.md §4); on faint target fields it cost
    # the faintest sources 5-10 % of their flux here, where hogbom recovers 94-100 %.
    deconvolver = str(params.get("deconvolver", "auto"))
    if deconvolver == "auto":
        deconvolver = "mtmfs" if request.get("calibrator_source") else "hogbom"
    nterms = 2 if deconvolver == "mtmfs" else 1
    suffix = ".tt0" if deconvolver == "mtmfs" else ""
    out = Path(request["output_dir"])
    base = out / "img"
    t = time.monotonic()
    ct.tclean(
        vis=str(ms),
        imagename=str(base),
        datacolumn="corrected",
        imsize=imsize,
        cell=f"{cell}arcsec",
        specmode="mfs",
        deconvolver=deconvolver,
        nterms=nterms,
        weighting="briggs",
        robust=robust,
        niter=niter,
        cyclefactor=cyclefactor,
        threshold=f"{nsigma * sigma * 1e3:.4f}mJy",
        gridder="standard",
        stokes="I",
        pbcor=False,
        interactive=False,
    )
    tclean_s = time.monotonic() - t
    image = Path(f"{base}.image{suffix}")
    if not image.exists():
        raise StageFailure(
            "retryable",
            "no_image",
            f"tclean wrote no {image.name}",
            "tclean failed silently; see the CASA log",
        )
    fits = out / "image.fits"
    ct.exportfits(imagename=str(image), fitsimage=str(fits), overwrite=True)
    _fix_obsgeo(fits, facts)
    qa = _measure(base, suffix, request, sigma, cell)
    png = out / "image.png"
    _preview(fits, png, request["group_id"], qa)
    # Keep the FITS, the preview and the CASA image; drop the bulky intermediates.
    keep = {f"img.image{suffix}", f"img.psf{suffix}", f"img.sumwt{suffix}"}
    for p in out.glob("img.*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    metrics = {
        **qa,
        "deconvolver": deconvolver,
        "cell_arcsec": cell,
        "imsize": imsize,
        "niter": niter,
        "cyclefactor": cyclefactor,
        "robust": robust,
        "umax_lambda": umax_lambda,
        "tclean_s": round(tclean_s, 2),
        **theory,
    }
    return {
        "artifacts": [
            {"path": "image.fits", "kind": "image_fits"},
            {"path": "image.png", "kind": "image_png"},
            {"path": f"img.image{suffix}", "kind": "casa_image"},
        ],
        "metrics": metrics,
        "qa": qa,
    }


def _measure(
    base: Path, suffix: str, request: dict[str, Any], sigma: float, cell: float
) -> dict[str, Any]:
    from casatools import image

    ia = image()
    ia.open(f"{base}.image{suffix}")
    pix = ia.getchunk()[:, :, 0, 0]
    cs = ia.coordsys()
    beam = ia.restoringbeam()
    reffreq = float(cs.referencevalue(format="n")["numeric"][3])
    centre = cs.referencevalue(format="n")["numeric"][:2]
    ia.close()
    ia.open(f"{base}.psf{suffix}")
    psf_peak = float(np.max(ia.getchunk()))
    ia.close()
    ia.open(f"{base}.sumwt{suffix}")
    sumwt = float(np.max(ia.getchunk()))
    ia.close()
    finite = bool(np.all(np.isfinite(pix)))
    if not finite or psf_peak <= 0 or sumwt <= 0:
        raise StageFailure(
            "validation",
            "blank_image",
            f"image unusable: finite={finite}, psf peak={psf_peak}, sumwt={sumwt}",
            "no usable visibilities reached the imager",
        )

    def arcsec(q: dict[str, Any]) -> float:
        return float(q["value"]) * {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0}[q["unit"]]

    bmaj, bmin = arcsec(beam["major"]), arcsec(beam["minor"])
    peak = float(pix.max())
    # Off-source noise: robust (MAD) rms outside 3 beams of every pixel above 5 x MAD rms.
    mad = 1.4826 * float(np.median(np.abs(pix - np.median(pix))))
    bright = pix > 5 * mad
    # 3 beams, but never more than a quarter of the image: a co-linear array's beam can be
    # 100 000" long (a flagged N-S arm), and the mask is then only a rough exclusion.
    radius = min(int(math.ceil(3 * bmaj / cell)), max(1, min(pix.shape[:2]) // 4))
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
        "beam_pa_deg": float(beam["positionangle"]["value"]),
        "beam_axis_ratio": bmaj / bmin if bmin > 0 else None,
        "psf_peak": psf_peak,
        "sumwt": sumwt,
        "reffreq_hz": reffreq,
        "image_finite": finite,
        "phase_centre_rad": [float(centre[0]), float(centre[1])],
    }
    cal = request.get("calibrator_source")
    if cal:
        world = [math.radians(cal["ra_deg"]), math.radians(cal["dec_deg"]), 1.0, reffreq]
        px, py = cs.topixel(world)["numeric"][:2]
        ix, iy = int(round(px)), int(round(py))
        r = max(2, int(round(0.5 * bmin / cell)))
        if 0 <= ix < pix.shape[0] and 0 <= iy < pix.shape[1]:
            box = pix[max(0, ix - r) : ix + r + 1, max(0, iy - r) : iy + r + 1]
            offset_deg = _sep_deg(
                cal["ra_deg"], cal["dec_deg"], math.degrees(centre[0]), math.degrees(centre[1])
            )
            fwhm_deg = math.degrees(
                PB_FWHM_FACTOR * C_M_S / reffreq / float(request["telescope"]["dish_diameter_m"])
            )
            beam_gain = math.exp(-4 * math.log(2) * (offset_deg / fwhm_deg) ** 2)
            expected = cal["flux_jy_1p4ghz"] * (reffreq / 1.4e9) ** cal["spectral_index"]
            measured, method = _fitted_flux(f"{base}.image{suffix}", ix, iy, r * 4)
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


def _fix_obsgeo(fits: Path, facts: dict[str, Any]) -> None:
    """exportfits writes OBSGEO-X/Y/Z as the observatory's (lon, lat, height) taken for
    Cartesian metres (|OBSGEO| = 1188 m here); write the array centre's ITRF XYZ instead."""
    from astropy.io import fits as pyfits

    centre = np.mean(np.asarray(facts["antenna_positions_m"]), axis=0)
    with pyfits.open(fits, mode="update") as hdul:
        for axis, value in zip("XYZ", centre, strict=True):
            hdul[0].header[f"OBSGEO-{axis}"] = (float(value), "[m] array centre, ITRF")


def _fitted_flux(image_path: str, ix: int, iy: int, half: int) -> tuple[float | None, str]:
    """Integrated flux (Jy) of a Gaussian fitted around pixel (ix, iy): unlike the peak
    pixel, it does not lose up to ~6 % when the source sits between pixel centres."""
    from casatools import image

    ia = image()
    try:
        ia.open(image_path)
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
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _preview(fits: Path, png: Path, group_id: str, qa: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.io import fits as pyfits

    data = np.squeeze(pyfits.getdata(fits))
    rms = qa["rms_jy"]
    fig, ax = plt.subplots(figsize=(6, 5.4), dpi=100)
    shown = ax.imshow(
        data * 1e3,
        origin="lower",
        cmap="inferno",
        vmin=-3 * rms * 1e3,
        vmax=max(10 * rms, 0.3 * qa["peak_jy"]) * 1e3,
    )
    fig.colorbar(shown, ax=ax, label="mJy/beam")
    ax.set_title(
        f"DSA-110 {group_id}\npeak {qa['peak_jy'] * 1e3:.1f} mJy, rms "
        f"{rms * 1e3:.2f} mJy, rms/theory {qa['rms_over_theory']:.2f}",
        fontsize=9,
    )
    ax.set_xlabel("RA pixel")
    ax.set_ylabel("Dec pixel")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    run(stage)
