"""The converter's lean path against pyuvdata's own: reading the subbands into one
preallocated array (stages/subband_reader.py) gives the same UVData as pyuvdata's
multi-file read, and writing CASA's conventions in place (stages/convert.py) gives the same
Measurement Set as pyuvdata's write_ms. (Memory is measured by `make bench`, not here.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from supervisor.simulate import SimulationSpec, simulate

pytestmark = pytest.mark.casa


def group_files(directory: Path) -> list[str]:
    """Ascending frequency: sb15 first."""
    return sorted((str(p) for p in directory.glob("*_sb*.hdf5")), key=lambda f: -int(f[-7:-5]))


@pytest.mark.parametrize(
    "shape", [{}, {"channel_order": "ascending"}, {"header_shapes": "old", "autos": False}]
)
def test_read_band_equals_pyuvdata_concatenation(tmp_path: Path, shape: dict) -> None:
    from pyuvdata import UVData

    from stages.subband_reader import read_band

    simulate(tmp_path, SimulationSpec(n_times=4, seed=9, **shape))
    files = group_files(tmp_path)
    band, how = read_band(files, block_bytes=3000)  # blocks of a few rows: many per file
    ref = UVData()
    ref.read(files, file_type="uvh5", axis="freq")
    ref.reorder_freqs(channel_order="freq")
    assert how == "per_subband"
    for name in ("data_array", "flag_array", "nsample_array", "uvw_array", "time_array"):
        assert np.array_equal(getattr(band, name), getattr(ref, name)), name
    assert np.allclose(band.freq_array, ref.freq_array)
    assert np.allclose(band.channel_width, np.abs(ref.channel_width))


def test_subbands_that_disagree_are_left_to_pyuvdatas_checks(tmp_path: Path) -> None:
    """A subband whose uvw differ is not copied channel-wise: pyuvdata's own read takes it
    and refuses it with its message (preflight normally names such a file first)."""
    from pyuvdata import UVData

    from stages.subband_reader import read_band

    simulate(tmp_path, SimulationSpec(n_times=4, seed=9))
    files = group_files(tmp_path)
    odd = UVData()
    odd.read(files[3], file_type="uvh5")
    odd.uvw_array = odd.uvw_array + 1e-3  # a subband whose uvw differ slightly
    odd.write_uvh5(files[3], clobber=True)
    with pytest.raises(ValueError, match="uvw_array does not match"):
        read_band(files)


@pytest.mark.parametrize("writer", ["chunked", "in_place"])
def test_the_lean_writers_make_the_same_measurement_set(tmp_path: Path, writer: str) -> None:
    """The chunked writer (in chunks of a few rows, so that a chunk boundary falls inside a
    time) and the in-place one (its fallback) against pyuvdata's write_ms."""
    from casacore.tables import table

    from stages.convert import write_ms_in_place
    from stages.ms_writer import chunked_writer_applies, write_ms_chunked
    from stages.subband_reader import read_band

    simulate(tmp_path / "in", SimulationSpec(n_times=4, seed=9))
    files = group_files(tmp_path / "in")
    reference, _ = read_band(files)
    reference.write_ms(str(tmp_path / "ref.ms"), clobber=True)
    lean, _ = read_band(files)
    if writer == "chunked":
        assert chunked_writer_applies(lean)
        before = lean.data_array.copy()
        row_bytes = lean.data_array[0].nbytes
        write_ms_chunked(lean, tmp_path / "lean.ms", chunk_bytes=7 * row_bytes)
        assert np.array_equal(lean.data_array, before)  # the band is left as it was
    else:
        write_ms_in_place(lean, tmp_path / "lean.ms")
    with (
        table(str(tmp_path / "ref.ms"), ack=False) as a,
        table(str(tmp_path / "lean.ms"), ack=False) as b,
    ):
        assert a.nrows() == b.nrows() > 0
        for column in a.colnames():
            if column == "FLAG_CATEGORY":  # never filled
                continue
            assert np.array_equal(a.getcol(column), b.getcol(column)), column
        assert a.getkeyword("pyuvdata_flip_conj") == b.getkeyword("pyuvdata_flip_conj")
        assert a.getcolkeyword("DATA", "QuantumUnits") == b.getcolkeyword("DATA", "QuantumUnits")
        assert a.getkeyword("pyuvdata_extra") == b.getkeyword("pyuvdata_extra")
    subtables = ("ANTENNA", "SPECTRAL_WINDOW", "FIELD", "POLARIZATION", "DATA_DESCRIPTION")
    for sub in (*subtables, "FEED", "OBSERVATION", "SOURCE", "POINTING", "HISTORY"):
        with (
            table(str(tmp_path / "ref.ms" / sub), ack=False) as a,
            table(str(tmp_path / "lean.ms" / sub), ack=False) as b,
        ):
            assert a.nrows() == b.nrows(), sub
            for column in a.colnames():
                if (sub, column) == ("HISTORY", "TIME"):  # when the history was written
                    continue
                assert _cells(a, column) == _cells(b, column), (sub, column)


def _cells(t, column: str) -> list:  # noqa: ANN001
    """A column's cells as comparable values ("undefined" for an empty array cell)."""
    out = []
    for row in range(t.nrows()):
        try:
            value = t.getcell(column, row)
        except RuntimeError:
            value = "undefined"
        out.append(np.asarray(value).tolist() if hasattr(value, "shape") else value)
    return out
