"""CASA tclean as the image stage's fallback imager (WSClean missing or failed): the same
field geometry and threshold, exported to the same FITS products."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from stages.imaging_geometry import FieldGeometry
from stages.protocol import StageFailure
from stages.wsclean_imager import CleanSettings, ImagerRun


def run_tclean(
    ms: Path,
    workdir: Path,
    geometry: FieldGeometry,
    clean: CleanSettings,
    *,
    deconvolver: str,
    cyclefactor: float,
) -> ImagerRun:
    """``deconvolver``: mtmfs (nterms=2) models the spectral index a bright calibrator
    needs across the 13 % band (hogbom's floor there is 4-9 mJy, REPORT.md §4); on faint
    target fields it cost the faintest sources 5-10 % of their flux, where hogbom recovers
    94-100 %. ``cyclefactor`` 3: with the sparse T-array PSF, CLEAN on a bright calibrator
    diverged at the default 1 (rms/theory 17.5; 0.96 at 3)."""
    import casatasks as ct
    from casatools import image

    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "img"
    nterms = 2 if deconvolver == "mtmfs" else 1
    suffix = ".tt0" if deconvolver == "mtmfs" else ""
    t = time.monotonic()
    ct.tclean(
        vis=str(ms),
        imagename=str(base),
        datacolumn="corrected" if clean.data_column == "CORRECTED_DATA" else "data",
        imsize=geometry.imsize,
        cell=f"{geometry.cell_arcsec}arcsec",
        specmode="mfs",
        deconvolver=deconvolver,
        nterms=nterms,
        weighting="briggs",
        robust=clean.robust,
        niter=clean.niter,
        cyclefactor=cyclefactor,
        threshold=f"{clean.threshold_jy * 1e3:.4f}mJy",
        gridder="standard",
        stokes="I",
        pbcor=False,
        # Negative: no primary-beam mask on the image (tclean would blank everything
        # beyond 0.2 of its own beam model, which for the OVRO_MMA stand-in is not ours);
        # the stage writes its own primary-beam-corrected image.
        pblimit=-1e-4,
        interactive=False,
    )
    seconds = time.monotonic() - t
    casa_image = Path(f"{base}.image{suffix}")
    if not casa_image.exists():
        raise StageFailure(
            "retryable",
            "no_image",
            f"tclean wrote no {casa_image.name} for {ms}",
            "tclean failed silently; see the CASA log",
        )
    image_fits, psf_fits = workdir / "tclean-image.fits", workdir / "tclean-psf.fits"
    ct.exportfits(imagename=str(casa_image), fitsimage=str(image_fits), overwrite=True)
    ct.exportfits(imagename=f"{base}.psf{suffix}", fitsimage=str(psf_fits), overwrite=True)
    ia = image()
    try:
        ia.open(f"{base}.sumwt{suffix}")
        weight_sum = float(np.max(ia.getchunk()))
    finally:
        ia.close()
    for p in workdir.glob("img.*"):
        shutil.rmtree(p, ignore_errors=True)
    return ImagerRun(
        image_fits=image_fits,
        psf_fits=psf_fits,
        residual_fits=None,
        weight_sum=weight_sum,
        seconds=seconds,
        major_cycles=None,
        iterations=None,
        version=f"casatasks {ct.version_string()}",
    )
