"""Checks the supervisor makes itself, per artifact kind, before it commits a stage: a
worker's own report is evidence, not truth (old failure mode: a stage "succeeds" with a
partial MS). Reads with python-casacore and astropy, never casatools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# numpy, python-casacore and astropy are imported where a check needs them: the daemon
# imports this module, and its cold start (to READY=1) should not pay for them.

REQUIRED_MS_COLUMNS = ("DATA", "UVW", "ANTENNA1", "ANTENNA2", "TIME", "FLAG")


def measurement_set(ms: Path) -> list[str]:
    """The MS opens, has the required columns and rows, and ascending positive channels."""
    import numpy as np
    from casacore.tables import table

    try:
        with table(str(ms), readonly=True, ack=False) as t:
            missing = [c for c in REQUIRED_MS_COLUMNS if c not in t.colnames()]
            rows = t.nrows()
        with table(str(ms / "SPECTRAL_WINDOW"), readonly=True, ack=False) as spw:
            freqs = np.concatenate([spw.getcell("CHAN_FREQ", i) for i in range(spw.nrows())])
            widths = np.concatenate([spw.getcell("CHAN_WIDTH", i) for i in range(spw.nrows())])
    except RuntimeError as exc:
        return [f"{ms.name} does not open as a Measurement Set: {exc}"]
    problems = []
    if missing:
        problems.append(f"{ms.name} lacks columns {missing}")
    if rows == 0:
        problems.append(f"{ms.name} has no rows")
    if freqs.size == 0 or np.any(np.diff(freqs) <= 0) or np.any(widths <= 0):
        problems.append(f"{ms.name}: channels are not ascending with positive widths")
    return problems


def fits_image(fits_path: Path) -> list[str]:
    """The FITS image opens, is one plane on the sky, finite, and not blank."""
    import numpy as np
    from astropy.io import fits

    try:
        data = np.squeeze(fits.getdata(fits_path))
    except (OSError, ValueError) as exc:
        return [f"{fits_path.name} is not a readable FITS image: {exc}"]
    if data.ndim != 2:
        return [f"{fits_path.name} has shape {data.shape}, expected one plane"]
    if not np.all(np.isfinite(data)):
        return [f"{fits_path.name} has non-finite pixels"]
    if not np.any(data):
        return [f"{fits_path.name} is blank"]
    return []


BY_KIND = {"ms": measurement_set, "image_fits": fits_image}


def check_artifacts_by_kind(result: dict[str, Any], output_dir: Path) -> list[str]:
    """Problems with the declared artifacts whose kind has a check (others: none)."""
    problems = []
    for art in result.get("artifacts", []):
        check = BY_KIND.get(str(art.get("kind")))
        if check is not None:
            problems += check(output_dir / art["path"])
    return problems
