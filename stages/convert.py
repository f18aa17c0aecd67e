"""Convert: 16 UVH5 subbands → one Measurement Set in ascending frequency, phased to the
meridian at the group's mid time, written in tmpfs when preflight found room (else in the
disk staging area) and moved into the attempt's output directory."""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages import flagging
from stages.common import (
    dir_bytes,
    inspect_ms,
    move_tree,
    ms_name,
    ordered_subband_files,
    quiet_astropy,
    set_telescope_name,
)
from stages.ms_writer import chunked_writer_applies, write_ms_chunked
from stages.protocol import StageFailure, run
from stages.subband_reader import read_band


def stage(request: dict[str, Any]) -> dict[str, Any]:
    quiet_astropy()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    preflight = request.get("upstream_metrics", {}).get("preflight", {})
    dropped = preflight.get("dropped_subbands") or {}
    files = ordered_subband_files(request, skip={int(sb) for sb in dropped})
    uvd, read_by = read_band(files)
    timings["read_s"] = time.monotonic() - t0
    nonfinite_flagged = _flag_nonfinite(uvd)
    rephased = _phase_to_meridian(uvd)
    uvd.channel_width = np.abs(uvd.channel_width)
    freqs = np.asarray(uvd.freq_array).ravel()
    if not np.all(np.diff(freqs) > 0):
        raise StageFailure(
            "validation",
            "frequency_order",
            "channels are not strictly ascending after reordering (overlap?)",
            "two subbands cover the same frequencies",
        )
    params = request["tier"].get("params") or {}
    t_flag = time.monotonic()
    flag_state = _flag_in_memory(uvd, params, freqs)
    timings["flag_s"] = time.monotonic() - t_flag

    out = Path(request["output_dir"])
    name = ms_name(request["group_id"])
    staging = _staging_dir(request, out)
    ms_tmp = staging / name
    shutil.rmtree(ms_tmp, ignore_errors=True)
    t1 = time.monotonic()
    if chunked_writer_applies(uvd):
        write_ms_chunked(uvd, ms_tmp)
        writer = "chunked"
    else:
        write_ms_in_place(uvd, ms_tmp)
        writer = "pyuvdata"
    timings["write_ms_s"] = time.monotonic() - t1
    # The visibilities go now, not when the collector finds pyuvdata's reference cycles:
    # the worker measured 5.7 GB at full size with them still held while the MS was read.
    del uvd
    gc.collect()
    set_telescope_name(ms_tmp, request["telescope"]["casa_name"], request["telescope"]["name"])
    stats = flag_state.done
    if stats is None:
        t_flag = time.monotonic()
        stats = _flag_ms_with_flagdata(ms_tmp, flag_state, freqs)
        timings["flag_s"] += time.monotonic() - t_flag
    if staging != out:
        move_tree(ms_tmp, out / name)
        shutil.rmtree(staging, ignore_errors=True)
    ms = out / name
    facts = inspect_ms(ms)
    _check(facts, ms)
    metrics = {
        "rows": facts["rows"],
        "n_spw": facts["n_spw"],
        "n_chan": facts["n_chan"],
        "freq_min_hz": facts["freq_min_hz"],
        "freq_max_hz": facts["freq_max_hz"],
        "flagged_fraction": facts["flagged_fraction"],
        "data_nonzero_fraction": facts["data_nonzero_fraction"],
        "n_antennas": len(facts["antennas"]),
        "telescope_name": facts["telescope_name"],
        "ms_bytes": dir_bytes(ms),
        "staged_in": "tmpfs" if staging != out else "disk",
        "rephased_to_meridian": rephased,
        "subbands_used": len(files),
        "dropped_subbands": {sb: d.get("reason") for sb, d in dropped.items()},
        "nonfinite_flagged": nonfinite_flagged,
        "read_by": read_by,
        "ms_writer": writer,
        **stats.metrics(),
        **{k: round(v, 3) for k, v in timings.items()},
    }
    return {"artifacts": [{"path": name, "kind": "ms"}], "metrics": metrics}


@dataclass
class _Flagging:
    """What in-memory flagging did: the final statistics, or what flagdata (on the MS, once
    written) needs to complete them."""

    flagger: str
    verdicts: list[flagging.AntennaVerdict]
    names: dict[int, str]
    fractions: tuple[float, float]  # input, antenna (of cross samples)
    done: flagging.FlagStatistics | None  # None: flagdata still to run


def _flag_in_memory(uvd: Any, params: dict[str, Any], freqs: np.ndarray) -> _Flagging:
    """Dead and noisy antennas, then (with AOFlagger) interference, on the arrays about to
    be written: no second pass over a multi-GB MS."""
    flagger = flagging.choose_flagger(str(params.get("flagger", "auto")))
    tel = uvd.telescope
    names = {
        int(n): str(name) for n, name in zip(tel.antenna_numbers, tel.antenna_names, strict=True)
    }
    hands = flagging.parallel_hands(uvd.polarization_array)
    ant1, ant2 = uvd.ant_1_array, uvd.ant_2_array
    cross = ant1 != ant2
    before = flagging.count_flags(uvd.flag_array, hands, cross)
    verdicts: list[flagging.AntennaVerdict] = []
    if flagger != "none":
        verdicts = flagging.broken_antennas(
            uvd.data_array,
            uvd.flag_array,
            ant1,
            ant2,
            uvd.polarization_array,
            names,
            float(params.get("dead_power_ratio", 0.1)),
            float(params.get("noisy_power_ratio", 4.0)),
        )
        broken = [v.antenna for v in verdicts]
        if broken:
            uvd.flag_array[np.isin(ant1, broken) | np.isin(ant2, broken)] = True
    working = flagging.working_cross_rows(ant1, ant2, verdicts)
    given = flagging.count_flags(uvd.flag_array, hands, working)
    fractions = flagging.input_and_antenna_fractions(before, given, cross)
    if flagger == "flagdata":
        return _Flagging(flagger, verdicts, names, fractions, None)
    if flagger == "aoflagger":
        flagging.flag_rfi_aoflagger(
            uvd.data_array,
            uvd.flag_array,
            ant1,
            ant2,
            uvd.time_array,
            uvd.polarization_array,
            {v.antenna for v in verdicts},
        )
    after = (
        flagging.count_flags(uvd.flag_array, hands, working) if flagger == "aoflagger" else given
    )
    stats = flagging.rfi_statistics(
        flagger, given, after, ant1, ant2, freqs, names, verdicts, fractions
    )
    return _Flagging(flagger, verdicts, names, fractions, stats)


def _flag_ms_with_flagdata(ms: Path, done: _Flagging, freqs: np.ndarray) -> flagging.FlagStatistics:
    """The fallback flagger on the written MS (CASA needs the MS), and the statistics."""
    from casacore.tables import table

    def counts() -> flagging.FlagCounts:
        with table(str(ms), readonly=True, ack=False) as t:
            flags = t.getcol("FLAG")  # (rows, chan, pol): every hand of the MS counts
        return flagging.count_flags(flags, list(range(flags.shape[2])), working)

    with table(str(ms), readonly=True, ack=False) as t:
        ant1, ant2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
    working = flagging.working_cross_rows(ant1, ant2, done.verdicts)
    given = counts()
    try:
        flagging.flag_rfi_flagdata(ms)
    except Exception as exc:  # noqa: BLE001 - CASA raises RuntimeError for anything
        raise StageFailure(
            "recoverable",
            "flagger_failed",
            f"flagdata on {ms}: {str(exc)[:300]}",
            "the next convert tier is tried",
        ) from exc
    after = counts()
    return flagging.rfi_statistics(
        "flagdata", given, after, ant1, ant2, freqs, done.names, done.verdicts, done.fractions
    )


def write_ms_in_place(uvd: Any, ms: Path) -> None:
    """pyuvdata's write_ms, but converting to CASA's conventions in place (conjugated
    visibilities, negated uvw) instead of in a copy of the visibilities: the MS is the same
    column for column (tests/test_convert_memory.py), ~2 x the visibilities less at the
    peak. ``uvd`` is spent afterwards. Checked already (read_band), so not again."""
    from casacore.tables import table

    np.conjugate(uvd.data_array, out=uvd.data_array)
    uvd.uvw_array *= -1.0
    uvd.write_ms(str(ms), clobber=True, flip_conj=False, run_check=False)
    with table(str(ms), readonly=False, ack=False) as t:
        t.putkeyword("pyuvdata_flip_conj", True)  # what the MS holds: CASA's convention


def _flag_nonfinite(uvd: Any) -> int:
    """Flag (and zero) NaN/Inf visibilities or weights: CASA would carry them into every
    sum. Returns how many samples were flagged (preflight named their files)."""
    count = 0
    step = max(1, (64 * 1024**2) // max(1, uvd.data_array[0].nbytes))  # rows: bounded memory
    for start in range(0, uvd.Nblts, step):
        rows = slice(start, start + step)
        data, nsample = uvd.data_array[rows], uvd.nsample_array[rows]
        bad = ~np.isfinite(data)
        bad |= ~np.isfinite(nsample)
        found = int(np.count_nonzero(bad))
        if found:
            count += found
            data[bad] = 0
            nsample[bad] = 0
            uvd.flag_array[rows][bad] = True
    return count


def _phase_to_meridian(uvd: Any) -> bool:
    """Drift-scan data → a sidereal centre at (LST at mid-group, pointing dec). pyuvdata
    cannot write drift (altaz) centres to an MS (REPORT.md §2)."""
    if all(c["cat_type"] == "sidereal" for c in uvd.phase_center_catalog.values()):
        return False
    times = np.unique(uvd.time_array)
    mid = int(np.argmin(np.abs(uvd.time_array - 0.5 * (times[0] + times[-1]))))
    dec = uvd.extra_keywords.get("phase_center_dec")
    if dec is None:
        raise StageFailure(
            "validation",
            "no_pointing_dec",
            "drift-scan data without Header/extra_keywords/phase_center_dec",
            "the files lack the pointing declination",
        )
    uvd.phase(
        ra=float(uvd.lst_array[mid]),
        dec=float(dec),
        epoch="J2000",
        cat_name="MERIDIAN_MID",
        cat_type="sidereal",
    )
    return True


def _staging_dir(request: dict[str, Any], out: Path) -> Path:
    """The attempt's tmpfs area when preflight found room there (the supervisor names it and
    removes it after the attempt, whatever happened), else the output directory."""
    preflight = request.get("upstream_metrics", {}).get("preflight", {})
    tmpfs = request.get("tmpfs_staging")
    if tmpfs and preflight.get("staging") == "tmpfs":
        path = Path(request.get("tmpfs_area") or Path(tmpfs) / f"{out.parent.name}-{out.name}")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return out


def _check(facts: dict[str, Any], ms: Path) -> None:
    problems = []
    if facts["missing_columns"]:
        problems.append(f"missing columns {facts['missing_columns']}")
    if facts["rows"] == 0:
        problems.append("no rows")
    if not facts["ascending"] or not facts["positive_widths"]:
        problems.append("frequencies not ascending with positive widths")
    if facts.get("data_nonzero_fraction", 0.0) == 0.0 and facts.get("flagged_fraction", 1) < 1:
        problems.append("DATA is all zero")
    if problems:
        raise StageFailure(
            "fatal",
            "bad_measurement_set",
            f"{ms}: " + "; ".join(problems),
            "the converter produced an invalid MS; this is a bug to report",
        )


if __name__ == "__main__":
    run(stage)
