"""Flag what must never reach calibration: dead or noisy antennas (from their
autocorrelation power) and radio-frequency interference (AOFlagger on each baseline's
time-frequency plane, or CASA flagdata tfcrop + rflag as the fallback), with statistics per
subband, antenna and reason.

Conventions: ``flags`` and ``data`` are (rows, channels, polarisations) with channels in
ascending frequency, as the converter holds them before writing the Measurement Set.
Fractions count cross-correlation samples (row x channel; a sample is flagged when any of
its polarisations is): autocorrelations are never imaged and are flagged by calibrate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import BAND_HIGH_HZ, SUBBAND_WIDTH_HZ
from stages.protocol import StageFailure

FLAGGERS = ("auto", "aoflagger", "flagdata", "none")


@dataclass(frozen=True)
class AntennaVerdict:
    """Why one antenna was flagged.

    reason: ``dead`` (no signal: system power far below the array's) or ``noisy`` (system
    power far above it); power_ratio: its median autocorrelation power over the array's
    median (cross-correlation amplitude squared where the data hold no autocorrelations).
    """

    antenna: int
    name: str
    reason: str
    power_ratio: float


@dataclass
class FlagStatistics:
    """What was flagged in one group, and why (fractions of cross-correlation samples).

    input_fraction: flagged in the files (or non-finite) before this stage flagged anything;
    antenna_fraction: flagged because their antenna is dead or noisy; rfi_fraction: flagged
    by the interference flagger, of the samples on working antennas it was given;
    per_subband: the interference fraction of each subband (``sbNN``); per_antenna: every
    antenna's total flagged fraction after flagging.
    """

    flagger: str
    input_fraction: float
    antenna_fraction: float
    rfi_fraction: float
    total_fraction: float
    antennas: dict[str, str] = field(default_factory=dict)
    per_subband: dict[str, float] = field(default_factory=dict)
    per_antenna: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "flagger": self.flagger,
            "input_flagged_fraction": round(self.input_fraction, 6),
            "antenna_flagged_fraction": round(self.antenna_fraction, 6),
            "rfi_flagged_fraction": round(self.rfi_fraction, 6),
            "cross_flagged_fraction": round(self.total_fraction, 6),
            "antennas_flagged": self.antennas,
            "rfi_flagged_fraction_per_subband": self.per_subband,
            "flagged_fraction_per_antenna": self.per_antenna,
        }


def choose_flagger(requested: str) -> str:
    """``auto``: AOFlagger where its Python module imports, else flagdata."""
    if requested not in FLAGGERS:
        raise StageFailure(
            "fatal",
            "bad_tier_params",
            f"flagger {requested!r} is not one of {', '.join(FLAGGERS)}",
            "fix stages.convert tiers in the configuration",
        )
    if requested != "auto":
        return requested
    try:
        import aoflagger  # noqa: F401
    except ImportError:
        return "flagdata"
    return "aoflagger"


def parallel_hands(pols: np.ndarray) -> list[int]:
    """Indices of XX and YY (AIPS codes -5, -6) or RR/LL (-1, -2); all pols if none."""
    idx = [i for i, p in enumerate(pols) if int(p) in (-5, -6, -1, -2, 1)]
    return idx or list(range(len(pols)))


def broken_antennas(
    data: np.ndarray,
    flags: np.ndarray,
    ant1: np.ndarray,
    ant2: np.ndarray,
    pols: np.ndarray,
    names: dict[int, str],
    dead_power_ratio: float,
    noisy_power_ratio: float,
) -> list[AntennaVerdict]:
    """Antennas whose median system power is below ``dead_power_ratio`` or above
    ``noisy_power_ratio`` times the array's median. The power is the autocorrelation where
    the data hold them; else the squared median cross-correlation amplitude on the
    antenna's baselines, which finds dead antennas but not noisy ones (a bright source
    dominates the amplitudes)."""
    hands = parallel_hands(pols)
    autos = ant1 == ant2
    power: dict[int, float] = {}
    if autos.any():
        for a in np.unique(ant1[autos]):
            rows = np.flatnonzero(autos & (ant1 == a))
            values = np.abs(data[rows][:, :, hands].real)
            good = ~flags[rows][:, :, hands]
            power[int(a)] = float(np.median(values[good])) if good.any() else math.nan
        use_autos = True
    else:
        for a in np.unique(np.concatenate([ant1, ant2])):
            rows = np.flatnonzero((ant1 == a) | (ant2 == a))
            values = np.abs(data[rows][:, :, hands])
            good = ~flags[rows][:, :, hands]
            power[int(a)] = float(np.median(values[good])) ** 2 if good.any() else math.nan
        use_autos = False
    finite = [p for p in power.values() if math.isfinite(p)]
    if not finite:
        return []
    median = float(np.median(finite))
    verdicts = []
    for a, p in sorted(power.items()):
        if not math.isfinite(p):  # already flagged throughout: nothing to add
            continue
        ratio = p / median if median > 0 else 1.0
        if ratio < dead_power_ratio:
            verdicts.append(AntennaVerdict(a, names.get(a, str(a)), "dead", ratio))
        elif use_autos and ratio > noisy_power_ratio:
            verdicts.append(AntennaVerdict(a, names.get(a, str(a)), "noisy", ratio))
    if len(verdicts) > len(power) // 2:
        # More than half the array "broken" means the median is not a working antenna's:
        # refuse to guess rather than flag the good half.
        raise StageFailure(
            "validation",
            "antennas_unusable",
            f"{len(verdicts)} of {len(power)} antennas look dead or noisy "
            f"({', '.join(f'{v.name}:{v.reason}' for v in verdicts[:8])})",
            "the array's power levels make no sense; quarantined for a person to look at",
        )
    return verdicts


def flag_rfi_aoflagger(
    data: np.ndarray,
    flags: np.ndarray,
    ant1: np.ndarray,
    ant2: np.ndarray,
    times: np.ndarray,
    pols: np.ndarray,
    skip_antennas: set[int],
    strategy_path: str | None = None,
) -> None:
    """Run AOFlagger on every cross-correlation baseline not touching ``skip_antennas`` and
    OR its flags into ``flags`` (all polarisations). One time-frequency plane per baseline:
    Stokes I of the parallel hands (real and imaginary), with the existing flags as input,
    so that interference in either hand is found at half the cost of flagging each."""
    try:
        import aoflagger
    except ImportError as exc:
        raise StageFailure(
            "recoverable",
            "flagger_unavailable",
            f"the aoflagger module does not import: {exc}",
            "the flagdata tier is tried",
        ) from exc
    try:
        _run_aoflagger(
            aoflagger, data, flags, ant1, ant2, times, pols, skip_antennas, strategy_path
        )
    except StageFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - the C++ library raises RuntimeError for anything
        raise StageFailure(
            "recoverable",
            "flagger_failed",
            f"AOFlagger failed: {type(exc).__name__}: {str(exc)[:300]}",
            "the flagdata tier is tried",
        ) from exc


def _run_aoflagger(
    aoflagger: Any,
    data: np.ndarray,
    flags: np.ndarray,
    ant1: np.ndarray,
    ant2: np.ndarray,
    times: np.ndarray,
    pols: np.ndarray,
    skip_antennas: set[int],
    strategy_path: str | None,
) -> None:
    flagger = aoflagger.AOFlagger()
    path = strategy_path or flagger.find_strategy_file(aoflagger.TelescopeId.Generic)
    strategy = flagger.load_strategy_file(path)
    hands = parallel_hands(pols)
    key = ant1.astype(np.int64) * 100_000 + ant2
    order = np.lexsort((times, key))
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(order)]
    image_sets: dict[int, Any] = {}
    n_chan = data.shape[1]
    for start, end in zip(starts, ends, strict=True):
        rows = order[start:end]
        a, b = int(ant1[rows[0]]), int(ant2[rows[0]])
        if a == b or a in skip_antennas or b in skip_antennas:
            continue
        prior = flags[rows][:, :, hands].any(axis=2)  # (time, chan)
        if prior.all():
            continue
        stokes_i = data[rows][:, :, hands].mean(axis=2)
        n_time = len(rows)
        images = image_sets.get(n_time)
        if images is None:
            images = image_sets[n_time] = flagger.make_image_set(n_time, n_chan, 2)
        images.set_image_buffer(0, np.ascontiguousarray(stokes_i.real.T, dtype=np.float32))
        images.set_image_buffer(1, np.ascontiguousarray(stokes_i.imag.T, dtype=np.float32))
        given = flagger.make_flag_mask(n_time, n_chan, False)
        given.set_buffer(np.ascontiguousarray(prior.T))
        found = np.asarray(strategy.run(images, given).get_buffer()).T  # (time, chan)
        flags[rows] |= found[:, :, None]


def flag_rfi_flagdata(ms: Path) -> None:
    """CASA's automatic flaggers on the written MS's DATA: tfcrop (time-frequency envelopes,
    3 sigma), then rflag (sliding rms, 4 sigma). A weaker fallback than AOFlagger, measured on
    the small test nights: >= 97 % of narrow-band and single-baseline interference but only
    50-80 % of broadband one-integration bursts (AOFlagger: all), and 8-18 % of clean data
    lost (most on a bright calibrator's field; AOFlagger: 2 %). Growing the flags (mode
    extend) caught more bursts and lost 20 % of clean data; CASA's default cutoffs lost less
    (0.5-12 %) but found only 29-56 % of the interference."""
    import casatasks as ct

    steps: list[dict[str, Any]] = [
        {"mode": "tfcrop", "timecutoff": 3.0, "freqcutoff": 3.0, "usewindowstats": "both"},
        {"mode": "rflag", "timedevscale": 4.0, "freqdevscale": 4.0},
    ]
    for step in steps:
        ct.flagdata(
            vis=str(ms),
            datacolumn="data",
            flagbackup=False,
            action="apply",
            extendflags=False,
            **step,
        )


def collapse(flags: np.ndarray, hands: list[int]) -> np.ndarray:
    """(rows, chan, pol) -> (rows, chan): a sample is flagged when any hand is."""
    return flags[:, :, hands].any(axis=2)


@dataclass(frozen=True)
class FlagCounts:
    """Flagged samples counted, not held as a mask (a full-size group's (rows, channels)
    mask is 86 MB, and the statistics took several): ``per_row`` the flagged channels of
    each row; ``per_channel`` the flagged rows of each channel among ``rows`` (a row mask)."""

    per_row: np.ndarray  # (rows,) int64
    per_channel: np.ndarray  # (channels,) int64
    rows: np.ndarray  # (rows,) bool: the rows per_channel counts


def count_flags(
    flags: np.ndarray, hands: list[int], rows: np.ndarray, chunk_bytes: int = 32 * 1024**2
) -> FlagCounts:
    """:class:`FlagCounts` of (rows, chan, pol) ``flags``, a chunk of rows at a time."""
    n_rows, n_chan = flags.shape[:2]
    per_row = np.zeros(n_rows, dtype=np.int64)
    per_channel = np.zeros(n_chan, dtype=np.int64)
    step = max(1, chunk_bytes // max(1, n_chan * len(hands)))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        chunk = collapse(flags[start:stop], hands)
        per_row[start:stop] = np.count_nonzero(chunk, axis=1)
        per_channel += np.count_nonzero(chunk[rows[start:stop]], axis=0)
    return FlagCounts(per_row, per_channel, rows)


def working_cross_rows(
    ant1: np.ndarray, ant2: np.ndarray, verdicts: list[AntennaVerdict]
) -> np.ndarray:
    """Cross-correlation rows between antennas not found broken: what the interference
    flagger works on and its statistics count."""
    broken = [v.antenna for v in verdicts]
    return (ant1 != ant2) & ~(np.isin(ant1, broken) | np.isin(ant2, broken))


def input_and_antenna_fractions(
    before: FlagCounts, after_antennas: FlagCounts, cross: np.ndarray
) -> tuple[float, float]:
    """Fractions of cross samples flagged as the files came, and added by antenna flagging
    (which only adds flags, so the added count is the difference of the counts)."""
    total = max(1, int(cross.sum()) * before.per_channel.size)
    flagged_before = int(before.per_row[cross].sum())
    flagged_after = int(after_antennas.per_row[cross].sum())
    return flagged_before / total, (flagged_after - flagged_before) / total


def rfi_statistics(
    flagger: str,
    given: FlagCounts,
    after: FlagCounts,
    ant1: np.ndarray,
    ant2: np.ndarray,
    freqs_hz: np.ndarray,
    names: dict[int, str],
    verdicts: list[AntennaVerdict],
    fractions: tuple[float, float],
) -> FlagStatistics:
    """The statistics of one group from the flag counts as given to the interference
    flagger and as it left them (both counted over :func:`working_cross_rows`; the
    flagger only adds flags), the antenna verdicts and ``fractions`` (input, antenna)
    from input_and_antenna_fractions."""
    working = working_cross_rows(ant1, ant2, verdicts)
    if not (np.array_equal(given.rows, working) and np.array_equal(after.rows, working)):
        raise ValueError("rfi_statistics: counts over other rows than the working cross rows")
    n_chan = freqs_hz.size
    n_working = int(working.sum())
    given_total = int(given.per_row[working].sum())
    found_total = int(after.per_row[working].sum()) - given_total
    found_per_channel = after.per_channel - given.per_channel
    subband = np.floor((BAND_HIGH_HZ - freqs_hz) / SUBBAND_WIDTH_HZ).astype(int)
    per_subband = {}
    for sb in np.unique(subband):
        chans = subband == sb
        clean = n_working * int(chans.sum()) - int(given.per_channel[chans].sum())
        per_subband[f"sb{int(sb):02d}"] = round(
            float(found_per_channel[chans].sum() / max(1, clean)), 6
        )
    cross = ant1 != ant2
    per_antenna = {}
    for ant in np.unique(np.concatenate([ant1[cross], ant2[cross]])):
        rows = cross & ((ant1 == ant) | (ant2 == ant))
        flagged = after.per_row[rows].sum() / max(1, int(rows.sum()) * n_chan)
        per_antenna[names.get(int(ant), str(ant))] = round(float(flagged), 6)
    n_cross = int(cross.sum())
    return FlagStatistics(
        flagger=flagger,
        input_fraction=fractions[0],
        antenna_fraction=fractions[1],
        rfi_fraction=float(found_total / max(1, n_working * n_chan - given_total)),
        total_fraction=float(after.per_row[cross].sum() / (n_cross * n_chan)) if n_cross else 0.0,
        antennas={v.name: f"{v.reason} (power {v.power_ratio:.3g} x median)" for v in verdicts},
        per_subband=per_subband,
        per_antenna=per_antenna,
    )
