"""Read a group's 16 subband files into one UVData in ascending frequency without holding
the visibilities twice: one full-band array is allocated and each file is read and copied
into its channels in turn.

pyuvdata's multi-file read keeps every file's arrays and then concatenates them (twice the
visibilities at its peak, ~3.7 x with the flags and weights left behind, measured at
48 antennas x 24 channels). Files whose time/baseline axes or metadata differ are read by
pyuvdata's own path instead, which checks and reconciles them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.common import release_freed_memory

# Per-baseline-time arrays that must agree between subbands for a channel-wise copy.
_BLT_ARRAYS = ("time_array", "ant_1_array", "ant_2_array", "uvw_array", "phase_center_id_array")


def read_band(files: list[str]) -> tuple[Any, str]:
    """The subbands in ``files`` as one UVData, channels ascending; and how it was read
    (``per_subband`` or ``pyuvdata_concat``, the fallback)."""
    from pyuvdata import UVData

    first = UVData()
    first.read(files[0], file_type="uvh5")
    headers = [first]
    for path in files[1:]:
        meta = UVData()
        meta.read(path, file_type="uvh5", read_data=False)
        headers.append(meta)
    if not _compatible(headers):
        uvd = UVData()
        uvd.read(files, file_type="uvh5", axis="freq")
        uvd.reorder_freqs(channel_order="freq")
        return uvd, "pyuvdata_concat"
    freqs = np.concatenate([np.asarray(h.freq_array).ravel() for h in headers])
    widths = np.concatenate([np.abs(np.asarray(h.channel_width).ravel()) for h in headers])
    order = np.argsort(freqs, kind="stable")
    freqs, widths = freqs[order], widths[order]
    n_blt, n_pol = first.Nblts, first.Npols
    data = np.empty((n_blt, len(freqs), n_pol), dtype=first.data_array.dtype)
    flags = np.empty((n_blt, len(freqs), n_pol), dtype=bool)
    nsamples = np.empty((n_blt, len(freqs), n_pol), dtype=first.nsample_array.dtype)
    for k, path in enumerate(files):
        if k == 0:
            sub = first
        else:
            sub = UVData()
            sub.read(path, file_type="uvh5")
        columns = np.searchsorted(freqs, np.asarray(sub.freq_array).ravel())
        data[:, columns] = sub.data_array
        flags[:, columns] = sub.flag_array
        nsamples[:, columns] = sub.nsample_array
    # The first subband's object becomes the band: its per-blt metadata serve all.
    first.data_array, first.flag_array, first.nsample_array = data, flags, nsamples
    first.freq_array = freqs
    first.channel_width = widths
    first.Nfreqs = len(freqs)
    first.flex_spw_id_array = np.full(len(freqs), first.spw_array[0], dtype=int)
    first.check()
    release_freed_memory()
    return first, "per_subband"


def _compatible(headers: list[Any]) -> bool:
    """One spectral window each, the same polarisations, and per-blt arrays equal, so that
    copying channels is all a concatenation would do."""
    ref = headers[0]
    if any(h.Nspws != 1 for h in headers):
        return False
    for h in headers[1:]:
        if h.Nblts != ref.Nblts or list(h.polarization_array) != list(ref.polarization_array):
            return False
        for name in _BLT_ARRAYS:
            a, b = getattr(ref, name), getattr(h, name)
            if a is None or b is None or a.shape != b.shape:
                return False
            if not np.array_equal(a, b):
                return False
    freqs = np.concatenate([np.asarray(h.freq_array).ravel() for h in headers])
    return len(np.unique(freqs)) == len(freqs)
