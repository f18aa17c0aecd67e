"""stages/flagging.py on arrays with known defects: dead and noisy antennas from their
autocorrelations (or, without autos, dead ones from cross amplitudes), AOFlagger on
interference in time-frequency planes, and the statistics per subband and antenna."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages import flagging
from stages.common import BAND_HIGH_HZ, SUBBAND_WIDTH_HZ
from stages.protocol import StageFailure

N_ANT, N_TIME, N_CHAN = 8, 24, 64
XX_YY = np.array([-5, -6])


def rows(autos: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pairs = [(i, j) for i in range(N_ANT) for j in range(i if autos else i + 1, N_ANT)]
    a1 = np.array([p[0] for p in pairs] * N_TIME)
    a2 = np.array([p[1] for p in pairs] * N_TIME)
    times = np.repeat(np.arange(N_TIME, dtype=float), len(pairs))
    return a1, a2, times


def visibilities(
    power: dict[int, float], autos: bool = True, seed: int = 1
) -> tuple[np.ndarray, ...]:
    """Noise-like cross-correlations (rms sqrt(p_i p_j)) plus a 5 Jy source on working
    antennas; autocorrelations = 100 x power (with 20 % gain scatter)."""
    rng = np.random.default_rng(seed)
    a1, a2, times = rows(autos)
    p = np.array([power.get(a, 1.0) for a in range(N_ANT)])
    gain2 = rng.uniform(0.8, 1.2, N_ANT)
    shape = (len(a1), N_CHAN, 2)
    noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * np.sqrt(p[a1] * p[a2])[
        :, None, None
    ]
    alive = (p[a1] > 0.05) & (p[a2] > 0.05)
    data = noise + 5.0 * alive[:, None, None]
    auto = a1 == a2
    data[auto] = (100.0 * p[a1[auto]] * gain2[a1[auto]])[:, None, None]
    flags = np.zeros(shape, dtype=bool)
    return data.astype(np.complex64), flags, a1, a2, times


NAMES = {a: f"DSA{a + 1:03d}" for a in range(N_ANT)}


def test_dead_and_noisy_antennas_are_found_from_the_autocorrelations() -> None:
    data, flags, a1, a2, _ = visibilities({2: 0.01, 5: 9.0})
    verdicts = flagging.broken_antennas(data, flags, a1, a2, XX_YY, NAMES, 0.1, 4.0)
    assert [(v.name, v.reason) for v in verdicts] == [("DSA003", "dead"), ("DSA006", "noisy")]
    assert verdicts[0].power_ratio < 0.02 and verdicts[1].power_ratio > 6


def test_without_autocorrelations_dead_antennas_are_found_from_cross_amplitudes() -> None:
    data, flags, a1, a2, _ = visibilities({2: 0.01, 5: 9.0}, autos=False)
    verdicts = flagging.broken_antennas(data, flags, a1, a2, XX_YY, NAMES, 0.1, 4.0)
    # A noisy antenna cannot be told from a bright sky without autos: only the dead one.
    assert [(v.name, v.reason) for v in verdicts] == [("DSA003", "dead")]


def test_a_healthy_array_has_no_broken_antennas() -> None:
    data, flags, a1, a2, _ = visibilities({})
    assert flagging.broken_antennas(data, flags, a1, a2, XX_YY, NAMES, 0.1, 4.0) == []


def test_half_the_array_broken_is_refused_rather_than_guessed() -> None:
    data, flags, a1, a2, _ = visibilities({0: 0.01, 1: 0.01, 2: 0.01, 3: 20.0, 4: 20.0})
    with pytest.raises(StageFailure) as err:
        flagging.broken_antennas(data, flags, a1, a2, XX_YY, NAMES, 0.1, 4.0)
    assert (err.value.category, err.value.code) == ("validation", "antennas_unusable")


def test_aoflagger_finds_a_narrow_band_channel_and_a_burst_and_counts_them() -> None:
    pytest.importorskip("aoflagger", reason="the aoflagger module is not installed")
    data, flags, a1, a2, times = visibilities({})
    cross = a1 != a2
    data[cross, 40, :] += 40.0  # a persistent channel on every baseline
    burst = cross & (times == 7)
    data[burst] += 20.0 * np.exp(2j * np.pi * np.random.default_rng(3).random((burst.sum(), 1, 1)))
    given_flags = flags.copy()
    given = flagging.count_flags(flags, [0, 1], cross)
    flagging.flag_rfi_aoflagger(data, flags, a1, a2, times, XX_YY, set())
    after = flagging.collapse(flags, [0, 1])
    assert after[cross, 40].all() and after[burst].all()
    clean = np.ones_like(after, dtype=bool)
    clean[:, 40] = False
    clean[times == 7] = False
    clean &= cross[:, None]
    assert after[clean].mean() < 0.05
    # Statistics: channel 40 lies in one subband; the bursts in every subband.
    freqs = BAND_HIGH_HZ - SUBBAND_WIDTH_HZ * 16 + (np.arange(N_CHAN) + 0.5) * 2.9296875e6
    counted = flagging.count_flags(flags, [0, 1], cross, chunk_bytes=1000)  # several chunks
    assert np.array_equal(counted.per_row, after.sum(axis=1))
    assert np.array_equal(counted.per_channel, after[cross].sum(axis=0))
    stats = flagging.rfi_statistics(
        "aoflagger", given, counted, a1, a2, freqs, NAMES, [], (0.0, 0.0)
    ).metrics()
    assert stats["rfi_flagged_fraction"] == pytest.approx(
        (after[cross].sum() - flagging.collapse(given_flags, [0, 1])[cross].sum())
        / (~flagging.collapse(given_flags, [0, 1])[cross]).sum(),
        abs=1e-6,  # metrics() rounds to 6 decimals
    )
    per_sb = stats["rfi_flagged_fraction_per_subband"]
    sb_of_40 = f"sb{int((BAND_HIGH_HZ - freqs[40]) // SUBBAND_WIDTH_HZ):02d}"
    assert len(per_sb) == 16 and max(per_sb, key=per_sb.get) == sb_of_40
    assert 0.05 < stats["rfi_flagged_fraction"] < 0.15
    assert set(stats["flagged_fraction_per_antenna"]) == set(NAMES.values())


def test_unknown_flagger_is_a_configuration_error() -> None:
    with pytest.raises(StageFailure) as err:
        flagging.choose_flagger("sumthreshold")
    assert (err.value.category, err.value.code) == ("fatal", "bad_tier_params")


def test_an_aoflagger_failure_is_recoverable_for_the_flagdata_tier() -> None:
    pytest.importorskip("aoflagger", reason="the aoflagger module is not installed")
    data, flags, a1, a2, times = visibilities({})
    with pytest.raises(StageFailure) as err:
        flagging.flag_rfi_aoflagger(
            data, flags, a1, a2, times, XX_YY, set(), strategy_path="/nonexistent/strategy.lua"
        )
    assert (err.value.category, err.value.code) == ("recoverable", "flagger_failed")


def test_config_check_names_a_bad_flagger_and_knows_the_same_flaggers(tmp_path: Path) -> None:
    from supervisor import config

    assert config.FLAGGERS == flagging.FLAGGERS
    (tmp_path / "bad.toml").write_text(
        '[stages.convert]\ntiers = [{ name = "primary", params = { flagger = "aoflager", '
        "dead_power_ratio = -1 } }]\n"
    )
    with pytest.raises(config.ConfigError) as err:
        config.load_config(workspace=tmp_path, path=tmp_path / "bad.toml", environ={})
    text = str(err.value)
    assert "stages.convert.tiers[0].params.flagger = 'aoflager'" in text
    assert "dead_power_ratio = -1" in text
