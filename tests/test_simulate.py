"""The simulator: file names, frequency order, shapes, headers, and a truth that explains the
data (gains, bandpass, sources, noise level)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from supervisor.ingest import parse_name
from supervisor.simulate import (
    BAND_HIGH_HZ,
    BAND_LOW_HZ,
    INTEGRATION_S,
    Fault,
    SimulationSpec,
    radiometer_sigma_image,
    simulate,
)


def read(path: Path):  # noqa: ANN201
    from pyuvdata import UVData

    uvd = UVData()
    uvd.read(str(path), file_type="uvh5", run_check=False)
    return uvd


def group_files(directory: Path, group_id: str) -> dict[int, Path]:
    truth = json.loads((directory / "truth" / f"{group_id}.json").read_text())
    return {int(name[-7:-5]): directory / name for name in truth["files"]}


def test_names_frequencies_shapes_and_headers(night) -> None:  # noqa: ANN001
    files = group_files(night.directory, night.group_ids[0])
    assert sorted(files) == list(range(16))
    stamps = [parse_name(p.name)[0] for p in files.values()]  # type: ignore[index]
    assert max(stamps) - min(stamps) <= __import__("datetime").timedelta(seconds=60)
    tops = []
    time_arrays = []
    for sb, path in sorted(files.items()):
        uvd = read(path)
        freqs = uvd.freq_array.ravel()
        assert np.all(np.diff(freqs) < 0), f"sb{sb:02d}: channels must descend"
        assert np.all(np.asarray(uvd.channel_width) < 0)
        assert (uvd.Nfreqs, uvd.Npols, uvd.Ntimes) == (4, 2, 24)
        assert uvd.Nblts == 24 * (8 * 9 // 2)  # autos included
        assert uvd.data_array.shape == (uvd.Nblts, 4, 2)
        assert np.allclose(uvd.integration_time, INTEGRATION_S)
        assert uvd.extra_keywords["phase_center_dec"] == pytest.approx(np.radians(33.159759))
        assert uvd.telescope.name == "DSA_110"
        tops.append(freqs.max())
        time_arrays.append(np.unique(uvd.time_array))
    assert np.all(np.diff(tops) < 0), "sb00 must hold the highest frequencies"
    width = (BAND_HIGH_HZ - BAND_LOW_HZ) / 16 / 4
    assert tops[0] == pytest.approx(BAND_HIGH_HZ - width / 2)
    assert read(files[15]).freq_array.min() == pytest.approx(BAND_LOW_HZ + width / 2)
    assert all(np.array_equal(time_arrays[0], t) for t in time_arrays)


def test_groups_follow_each_other_every_309_seconds(night) -> None:  # noqa: ANN001
    starts = []
    for gid in night.group_ids:
        truth = json.loads((night.directory / "truth" / f"{gid}.json").read_text())
        starts.append(np.datetime64(truth["start_utc"][:19]))
    gaps = np.diff(starts).astype("timedelta64[ms]").astype(float) / 1000
    assert np.allclose(gaps, 24 * INTEGRATION_S, atol=1.0)


def test_truth_explains_the_noiseless_data(tmp_path: Path) -> None:
    """Divide out the truth gains and bandpass: what is left is the truth sky."""
    spec = SimulationSpec(calibrator="3C286", sefd_jy=0.0, n_field_sources=0, seed=3)
    (truth,) = simulate(tmp_path, spec)
    assert truth.calibrator == "3C286"
    (cal,) = truth.sources
    npz = np.load(tmp_path / "truth" / f"{truth.group_id}.npz")
    np.testing.assert_allclose(npz["gains_casa"], np.conj(npz["gains_pyuvdata"]))
    files = group_files(tmp_path, truth.group_id)
    uvd = read(files[8])
    freqs = uvd.freq_array.ravel()
    idx = np.searchsorted(npz["freqs_hz"], freqs)
    gains, bp = npz["gains_pyuvdata"], npz["bandpass_pyuvdata"][:, :, idx]
    times = np.unique(uvd.time_array)
    expected_flux = cal["flux_jy_1p4ghz"] * (freqs / 1.4e9) ** cal["spectral_index"]
    cross = uvd.ant_1_array != uvd.ant_2_array
    t_idx = np.searchsorted(times, uvd.time_array)
    for pol in range(2):
        gi = gains[t_idx, uvd.ant_1_array, pol][:, None] * bp[uvd.ant_1_array, pol]
        gj = gains[t_idx, uvd.ant_2_array, pol][:, None] * bp[uvd.ant_2_array, pol]
        uvd.data_array[:, :, pol] /= gi * np.conj(gj)
    # Amplitude: beam x catalogue flux on every baseline, channel and time.
    np.testing.assert_allclose(
        np.abs(uvd.data_array[cross]),
        np.broadcast_to(
            (expected_flux * cal["beam_gain_1p4ghz"])[:, None], uvd.data_array[cross].shape
        ),
        rtol=1e-3,
    )
    # Phase: pyuvdata's own phasing code, rephasing to the calibrator's position, must
    # cancel the geometric phase exactly (a sign or convention error would double it).
    uvd.phase(
        ra=np.radians(cal["ra_deg"]),
        dec=np.radians(cal["dec_deg"]),
        epoch="J2000",
        cat_name="cal",
        use_ant_pos=True,
    )
    assert np.degrees(np.abs(np.angle(uvd.data_array[cross]))).max() < 0.5


def test_noise_matches_the_radiometer_equation(tmp_path: Path) -> None:
    noisy = simulate(tmp_path / "a", SimulationSpec(seed=5, n_field_sources=1))[0]
    clean = simulate(tmp_path / "b", SimulationSpec(seed=5, n_field_sources=1, sefd_jy=0.0))[0]
    a = read(tmp_path / "a" / noisy.files[3])
    b = read(tmp_path / "b" / clean.files[3])
    cross = a.ant_1_array != a.ant_2_array
    diff = (a.data_array - b.data_array)[cross]
    assert np.std(diff.real) == pytest.approx(noisy.sigma_vis_jy, rel=0.05)
    assert np.std(diff.imag) == pytest.approx(noisy.sigma_vis_jy, rel=0.05)
    assert noisy.sigma_vis_jy == pytest.approx(6500 / np.sqrt(2 * 2.9296875e6 * INTEGRATION_S))
    assert noisy.sigma_image_jy == pytest.approx(
        radiometer_sigma_image(6500, 8, 187.5e6, 24 * INTEGRATION_S)
    )


def test_faults(tmp_path: Path) -> None:
    faults = (
        Fault("drop", 0, 2),
        Fault("truncate", 0, 3),
        Fault("garbage", 0, 4),
        Fault("duplicate", 0, 5),
    )
    (truth,) = simulate(tmp_path, SimulationSpec(faults=faults, n_field_sources=0))
    names = sorted(p.name for p in tmp_path.glob("*.hdf5"))
    assert len(names) == 16  # 16 - dropped + duplicate
    assert not any(n.endswith("_sb02.hdf5") for n in names)
    assert sum(n.endswith("_sb05.hdf5") for n in names) == 2
    sizes = {int(n[-7:-5]): (tmp_path / n).stat().st_size for n in names}
    assert sizes[3] < sizes[0] and sizes[4] == 4096
    assert (tmp_path / names[0]).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert {f["kind"] for f in truth.faults} == {"drop", "truncate", "garbage", "duplicate"}


def test_drift_phase_centre(tmp_path: Path) -> None:
    (truth,) = simulate(tmp_path, SimulationSpec(phase="drift", n_field_sources=1, dec_deg=40.0))
    uvd = read(tmp_path / truth.files[0])
    (cat,) = uvd.phase_center_catalog.values()
    assert cat["cat_type"] == "driftscan"
    assert uvd.extra_keywords["phase_center_dec"] == pytest.approx(np.radians(40.0))


def test_full_dsa110_channel_and_antenna_count(tmp_path: Path) -> None:
    """96 antennas x 48 channels per subband (one integration to keep the test small)."""
    spec = SimulationSpec(n_antennas=96, n_channels_per_subband=48, n_times=1, n_field_sources=2)
    (truth,) = simulate(tmp_path, spec)
    uvd = read(tmp_path / truth.files[0])
    assert (uvd.Nants_data, uvd.Nfreqs, uvd.Nbls) == (96, 48, 96 * 97 // 2)
    assert abs(uvd.channel_width[0]) == pytest.approx(244140.625)
    assert truth.sigma_image_jy == pytest.approx(
        6500 / np.sqrt(2 * 96 * 95 * 187.5e6 * INTEGRATION_S)
    )


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="jitter=90"):
        SimulationSpec(jitter_s=90)
    with pytest.raises(ValueError, match="no such file"):
        SimulationSpec(faults=(Fault("drop", 3, 0),))
    with pytest.raises(ValueError, match="not in the catalogue"):
        simulate("/tmp/never", SimulationSpec(calibrator="3C999"))


def test_a_persistent_sky_is_shared_by_neighbouring_groups_and_listed_once(
    tmp_path: Path,
) -> None:
    spec = SimulationSpec(
        n_groups=2, n_times=2, sky="persistent", field_radius_deg=1.5, seed=4, sefd_jy=0.0
    )
    first, second = simulate(tmp_path, spec)
    names = [{s["name"] for s in t.sources} for t in (first, second)]
    shared = names[0] & names[1]
    assert shared, "groups 1.3 deg apart with a 1.5 deg radius must share sources"
    by_name = [{s["name"]: s for s in t.sources} for t in (first, second)]
    for name in shared:  # the same source: same position and flux, another offset
        a, b = by_name[0][name], by_name[1][name]
        assert (a["ra_deg"], a["dec_deg"], a["flux_jy_1p4ghz"]) == (
            b["ra_deg"],
            b["dec_deg"],
            b["flux_jy_1p4ghz"],
        )
        assert a["offset_deg"] != b["offset_deg"]
    fluxes = [s["flux_jy_1p4ghz"] for t in (first, second) for s in t.sources]
    assert all(0.02 <= f <= 1.0 for f in fluxes)
    rows = (tmp_path / "truth" / "sky_catalogue.csv").read_text().splitlines()[3:]
    assert len(rows) == len(names[0] | names[1])  # each source once
    with pytest.raises(ValueError, match="sky="):
        SimulationSpec(sky="static")
