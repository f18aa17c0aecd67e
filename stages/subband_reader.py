"""Read a group's 16 subband files into one UVData in ascending frequency, holding the
visibilities once: one full-band array is allocated and each file's data are read into its
channels a block of rows at a time.

pyuvdata's multi-file read keeps every file's arrays and then concatenates them (twice the
visibilities at its peak, ~3.7 x with the flags and weights left behind, measured at
48 antennas x 24 channels). Here the headers are read (metadata only, one at a time, each
compared with the first and let go), then each file's ``Data/visdata``, ``flags`` and
``nsamples`` are copied from HDF5 in blocks of rows: the only extra memory is one block.
Files whose time/baseline axes or metadata differ are read by pyuvdata's own path instead,
which checks and reconciles them; a file whose data layout this reader does not know is
read whole by pyuvdata and copied.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Any

import numpy as np

# Imported here, not inside read_band: importing pyuvdata leaves frames alive (something in
# its import keeps its module frame), and a frame reached from read_band's own kept that
# function's locals, the whole band, alive after the converter let it go (2.2 GB at full
# size, measured).
from pyuvdata import UVData

from stages.common import release_freed_memory

# Per-baseline-time arrays that must agree between subbands for a channel-wise copy.
_BLT_ARRAYS = ("time_array", "ant_1_array", "ant_2_array", "uvw_array", "phase_center_id_array")
BLOCK_BYTES = 32 * 1024**2  # visibilities read from HDF5 per block of rows


def read_band(files: list[str], *, block_bytes: int = BLOCK_BYTES) -> tuple[Any, str]:
    """The subbands in ``files`` as one UVData, channels ascending; and how it was read
    (``per_subband`` or ``pyuvdata_concat``, the fallback)."""
    first = UVData()
    first.read(files[0], file_type="uvh5", read_data=False)
    freq_parts = [np.asarray(first.freq_array).ravel()]
    width_parts = [np.abs(np.asarray(first.channel_width).ravel())]
    for path in files[1:]:
        meta = UVData()
        meta.read(path, file_type="uvh5", read_data=False)
        if not _compatible(first, meta):
            return _read_by_pyuvdata(files)
        freq_parts.append(np.asarray(meta.freq_array).ravel())
        width_parts.append(np.abs(np.asarray(meta.channel_width).ravel()))
        del meta  # its per-blt arrays (~20 MB at full size): one header at a time
    freqs, widths = np.concatenate(freq_parts), np.concatenate(width_parts)
    if len(np.unique(freqs)) != len(freqs):
        return _read_by_pyuvdata(files)
    order = np.argsort(freqs, kind="stable")
    freqs, widths = freqs[order], widths[order]
    n_blt, n_pol = first.Nblts, first.Npols
    shape = (n_blt, len(freqs), n_pol)
    dtype, weight_dtype = _band_dtypes(files[0])
    data = np.empty(shape, dtype=dtype)
    flags = np.empty(shape, dtype=bool)
    nsamples = np.empty(shape, dtype=weight_dtype)
    for path, file_freqs in zip(files, freq_parts, strict=True):
        columns = np.searchsorted(freqs, file_freqs)
        try:
            copied = _copy_blocks(path, columns, data, flags, nsamples, block_bytes)
        except OSError:  # e.g. a compression filter h5py lacks: pyuvdata says what is missing
            copied = False
        if not copied:
            _copy_whole(path, columns, data, flags, nsamples)
    first.data_array, first.flag_array, first.nsample_array = data, flags, nsamples
    first.freq_array = freqs
    first.channel_width = widths
    first.Nfreqs = len(freqs)
    first.flex_spw_id_array = np.full(len(freqs), first.spw_array[0], dtype=int)
    # What pyuvdata's read of each file would check and fix (autocorrelations' imaginary
    # parts), once, on the band.
    first.check(check_autos=True, fix_autos=True)
    release_freed_memory()
    return first, "per_subband"


def _read_by_pyuvdata(files: list[str]) -> tuple[Any, str]:
    gc.collect()
    uvd = UVData()
    uvd.read(files, file_type="uvh5", axis="freq")
    uvd.reorder_freqs(channel_order="freq")
    return uvd, "pyuvdata_concat"


def _band_dtypes(path: str) -> tuple[np.dtype, np.dtype]:
    """The band's visibility and weight types, as pyuvdata reads the first file: complex128
    when it stores that, else complex64 (pyuvdata's default); weights as stored."""
    with _open_hdf5(path) as fh:
        stored, weights = fh["Data/visdata"].dtype, fh["Data/nsamples"].dtype
    vis = np.dtype(np.complex128) if stored == np.complex128 else np.dtype(np.complex64)
    return vis, np.dtype(weights)


def _open_hdf5(path: str) -> Any:
    import h5py

    _register_compression_filters()
    return h5py.File(path, "r")


@functools.cache
def _register_compression_filters() -> None:
    """The compression filters pyuvdata's writer may use (bitshuffle) register themselves
    when hdf5plugin is imported; without it such files go to pyuvdata, which says so.
    Tried once: a failed import's traceback keeps the importing frames (and so the band
    being read) alive."""
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401


def _copy_blocks(
    path: str,
    columns: np.ndarray,
    data: np.ndarray,
    flags: np.ndarray,
    nsamples: np.ndarray,
    block_bytes: int,
) -> bool:
    """Copy one file's visibilities, flags and weights into the band's ``columns``, a block
    of rows at a time; False (nothing copied) when the layout is not the plain one: native
    complex or (r, i) compound visibilities of shape (blt, [1,] chan, pol)."""
    with _open_hdf5(path) as fh:
        group = fh["Data"]
        vis, flg, nsm = group["visdata"], group["flags"], group["nsamples"]
        n_blt, n_pol = data.shape[0], data.shape[2]
        expected = {(n_blt, len(columns), n_pol), (n_blt, 1, len(columns), n_pol)}
        if not {vis.shape, flg.shape, nsm.shape} <= expected or len({vis.shape, flg.shape}) > 1:
            return False
        compound = vis.dtype.names is not None
        if compound and set(vis.dtype.names) != {"r", "i"}:
            return False
        if not compound and vis.dtype.kind != "c":
            return False
        old_shape = vis.ndim == 4
        row_bytes = max(1, len(columns) * n_pol * data.itemsize)
        step = max(1, block_bytes // row_bytes)
        for start in range(0, n_blt, step):
            rows = slice(start, min(n_blt, start + step))
            block = vis[rows]
            if compound:
                values = np.empty(block.shape, dtype=data.dtype)
                values.real, values.imag = block["r"], block["i"]
                block = values
            if old_shape:
                block = block[:, 0]
            data[rows, columns] = block
            flags[rows, columns] = flg[rows][:, 0] if old_shape else flg[rows]
            nsamples[rows, columns] = nsm[rows][:, 0] if old_shape else nsm[rows]
    return True


def _copy_whole(
    path: str, columns: np.ndarray, data: np.ndarray, flags: np.ndarray, nsamples: np.ndarray
) -> None:
    """A file of another layout: pyuvdata reads it (all its conversions), then it is copied."""
    sub = UVData()
    sub.read(path, file_type="uvh5")
    data[:, columns] = sub.data_array
    flags[:, columns] = sub.flag_array
    nsamples[:, columns] = sub.nsample_array
    # A UVData holds reference cycles: collect it now, not when the collector next runs.
    sub.data_array = sub.flag_array = sub.nsample_array = None
    del sub
    gc.collect()


def _compatible(ref: Any, other: Any) -> bool:
    """One spectral window each, the same polarisations, and per-blt arrays equal, so that
    copying channels is all a concatenation would do."""
    if ref.Nspws != 1 or other.Nspws != 1:
        return False
    if other.Nblts != ref.Nblts or list(other.polarization_array) != list(ref.polarization_array):
        return False
    for name in _BLT_ARRAYS:
        a, b = getattr(ref, name), getattr(other, name)
        if a is None or b is None or a.shape != b.shape:
            return False
        if not np.array_equal(a, b):
            return False
    return True
