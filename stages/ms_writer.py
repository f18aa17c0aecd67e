"""Write a band as a Measurement Set in bounded memory: pyuvdata's own layout and
subtables, but the main table's visibility columns go in row chunks.

Why: pyuvdata's ``write_ms`` hands each whole column to casacore, which copies it (the
1.4 GB DATA column of a full-size group, then WEIGHT_SPECTRUM), and takes the median of
the whole nsample array (another copy) for the band-averaged weights. Here each chunk of
rows is converted to CASA's conventions (conjugated visibilities, negated uvw: pyuvdata's
``flip_conj``) and written on its own, so the extra memory is one chunk, and the UVData is
left as it was. The result is the same MS, column for column and keyword for keyword
(tests/test_convert_memory.py).

Only what the converter makes is handled this way: one spectral window, sidereal phase
centres, baselines conjugated one way, no model or corrected data.
:func:`chunked_writer_applies` says when; otherwise use pyuvdata's writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHUNK_BYTES = 32 * 1024**2  # visibilities per chunk of rows (complex64: 8 bytes each)


def chunked_writer_applies(uvd: Any) -> bool:
    """True when :func:`write_ms_chunked` writes what pyuvdata's writer would."""
    ant1, ant2 = uvd.ant_1_array, uvd.ant_2_array
    mixed = bool(np.any(ant1 < ant2) and np.any(ant1 > ant2))
    sidereal = all(c["cat_type"] == "sidereal" for c in uvd.phase_center_catalog.values())
    return uvd.Nspws == 1 and sidereal and not mixed and uvd.data_array.ndim == 3


def write_ms_chunked(uvd: Any, path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> None:
    """``uvd`` as the MS ``path`` (replaced if it exists), as ``uvd.write_ms(path,
    flip_conj=True)`` would write it; ``uvd`` is not modified (see the module docstring)."""
    import shutil

    from astropy.time import Time
    from pyuvdata import utils
    from pyuvdata.utils.io import ms as ms_utils

    if not chunked_writer_applies(uvd):
        raise ValueError("write_ms_chunked: use pyuvdata's write_ms for this UVData")
    if uvd.scan_number_array is None:
        uvd._set_scan_numbers()
    shutil.rmtree(path, ignore_errors=True)
    filepath = str(path)
    pol_order = utils.tools.slicify(
        utils.pol.determine_pol_order(uvd.polarization_array, order="CASA"), allow_empty=True
    )
    n_rows = uvd.Nblts
    row_bytes = max(1, uvd.data_array[0].nbytes)
    step = max(1, chunk_bytes // row_bytes)
    weights = np.zeros((n_rows, uvd.Npols), dtype=float)

    ms = ms_utils.init_ms_file(filepath, make_model_col=False, make_corr_col=False)
    try:
        ms.addrows(n_rows)
        for start in range(0, n_rows, step):
            rows = slice(start, min(n_rows, start + step))
            count = rows.stop - start
            nsample = uvd.nsample_array[rows]
            columns = {
                "DATA": np.conjugate(uvd.data_array[rows][:, :, pol_order]),
                "WEIGHT_SPECTRUM": np.ascontiguousarray(nsample[:, :, pol_order]),
                "FLAG": np.ascontiguousarray(uvd.flag_array[rows][:, :, pol_order]),
            }
            for name, values in columns.items():
                ms.putcol(name, values, start, count)
            del columns
            # pyuvdata's band-representative weight: the median nsample over channels.
            weights[rows] = np.median(nsample, axis=1)
        ms.putcolkeyword("DATA", "QuantumUnits", uvd.vis_units)
        ms.putcol("WEIGHT", weights)
        ms.putcol("SIGMA", np.power(weights, -0.5, where=(weights != 0), out=None))
        ms.putcol("ANTENNA1", uvd.ant_1_array)
        ms.putcol("ANTENNA2", uvd.ant_2_array)
        ms.putcol("INTERVAL", uvd.integration_time)
        ms.putcol("EXPOSURE", uvd.integration_time)
        ms.putcol("DATA_DESC_ID", np.zeros(n_rows))
        ms.putcol("SCAN_NUMBER", uvd.scan_number_array)
        unique_jd, index = np.unique(uvd.time_array, return_inverse=True)
        seconds = (Time(unique_jd, format="jd", scale="utc").mjd * 86400.0)[index]
        ms.putcol("TIME", seconds)
        ms.putcol("TIME_CENTROID", seconds)
        ms.putcol("UVW", uvd.uvw_array * -1)
        field_ids = np.empty_like(uvd.phase_center_id_array)
        for idx, cat_id in enumerate(uvd.phase_center_catalog):
            field_ids[uvd.phase_center_id_array == cat_id] = idx
        ms.putcol("FIELD_ID", field_ids)
        if len(uvd.extra_keywords) != 0:
            ms.putkeyword("pyuvdata_extra", uvd.extra_keywords)
        if uvd.pol_convention is not None:
            ms.putkeyword("pyuvdata_polconv", uvd.pol_convention)
        ms.putkeyword("pyuvdata_flip_conj", True)
    finally:
        ms.done()
    ms_utils.write_ms_antenna(filepath, uvobj=uvd)
    ms_utils.write_ms_data_description(filepath, uvobj=uvd)
    ms_utils.write_ms_feed(filepath, uvobj=uvd)
    ms_utils.write_ms_field(filepath, uvobj=uvd)
    ms_utils.write_ms_history(filepath, uvobj=uvd)
    ms_utils.write_ms_observation(filepath, uvobj=uvd)
    ms_utils.write_ms_pointing(filepath, uvobj=uvd)
    ms_utils.write_ms_polarization(filepath, pol_order=pol_order, uvobj=uvd)
    ms_utils.write_ms_source(filepath, uvobj=uvd)
    ms_utils.write_ms_spectral_window(filepath, uvobj=uvd)
