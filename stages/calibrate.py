"""Calibrate: solve on a calibrator group (model → G0 → bandpass → gains → apply), or apply the
tables the supervisor chose for a target group. Checks what CASA does not: tables exist,
every spectral window was solved, solutions are mostly unflagged, CORRECTED_DATA is non-zero.

The MS is the committed product of ``convert``; MODEL_DATA/CORRECTED_DATA are written into
it in place (copying a 5 GB MS per attempt is not affordable). The tables go to the attempt's
output directory; the image stage only runs after this stage committed.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import apparent_spectrum, committed_ms, inspect_ms
from stages.protocol import StageFailure, casa_log_lines, run, write_json_atomic

UNSOLVED_RE = re.compile(r"could not be (solved|corrected)")


def stage(request: dict[str, Any]) -> dict[str, Any]:
    ms = committed_ms(request)
    plan = request.get("calibration_plan") or {}
    if plan.get("mode") == "solve":
        return _solve(request, ms, plan)
    if plan.get("mode") == "apply":
        return _apply_only(request, ms, plan)
    raise StageFailure(
        "fatal",
        "no_calibration_plan",
        "the request carries no calibration plan",
        "a supervisor bug: report it",
    )


def _solve(request: dict[str, Any], ms: Path, plan: dict[str, Any]) -> dict[str, Any]:
    import casatasks as ct

    params = request["tier"]["params"]
    out = Path(request["output_dir"])
    tables = {"G0": out / "G0.pcal", "B": out / "B.bcal", "G": out / "G.gcal"}
    timings: dict[str, float] = {}
    t = time.monotonic()
    facts = _flag_autocorrelations(ms)
    refant = str(params.get("refant") or _central_antenna(facts))
    minsnr = float(params.get("minsnr", 5.0))
    _refuse_faint_calibrator(request, plan, facts, minsnr)
    # Model: the catalogue sources in the field (calibrator first), each where it really is
    # and as bright as the primary beam lets it appear at each frequency.
    cl_path = out / "model.cl"
    write_model(cl_path, plan["model"], facts, float(request["telescope"]["dish_diameter_m"]))
    ct.ft(vis=str(ms), complist=str(cl_path), usescratch=True)
    timings["model_s"] = time.monotonic() - t
    # G0 on the central channels only: over the whole band, per-antenna delays decorrelate
    # a phase-only solution (REPORT.md §3, pitfall 1).
    nchan = facts["n_chan"]
    half = max(1, nchan // 16)
    g0_spw = f"0:{nchan // 2 - half}~{nchan // 2 + half - 1}" if facts["n_spw"] == 1 else ""
    t = time.monotonic()
    stats = _solve_tables(ms, tables, refant, g0_spw, minsnr, params)
    timings["solve_s"] = time.monotonic() - t
    # Antennas convert flagged as dead or noisy have flagged solutions by design: judge the
    # solutions of the antennas that had data.
    upstream = (request.get("upstream_metrics") or {}).get("convert") or {}
    broken_names = set(upstream.get("antennas_flagged") or {})
    broken = {i for i, name in enumerate(facts["antennas"]) if name in broken_names}
    quality = {kind: _table_quality(path, broken) for kind, path in tables.items()}
    _fail_if_casa_skipped_spws(
        request,
        "unsolved_spw",
        "CASA skipped spectral windows",
        "some SPWs lack (pre-)calibration; the next tier retries",
    )
    t = time.monotonic()
    _applycal(ms, [str(tables["B"]), str(tables["G"])], ["nearest", "linear"])
    timings["apply_s"] = time.monotonic() - t
    corrected = _corrected_check(ms)
    metrics = {
        "mode": "solve",
        "calibration_tier": plan.get("tier"),
        "calibration_skipped": plan.get("skipped", []),
        "calibrator": plan.get("calibrator"),
        "calibrator_offset_deg": plan["model"][0].get("offset_deg"),
        "calibrator_pb_gain_1p4ghz": plan["model"][0].get("pb_gain_1p4ghz"),
        "refant": refant,
        "antennas_flagged_upstream": sorted(broken_names),
        "model_sources": len(plan["model"]),
        "model_field_flux_jy_1p4ghz": sum(
            float(m.get("apparent_flux_jy_1p4ghz", 0.0)) for m in plan["model"][1:]
        ),
        "sky_model": plan.get("sky_model"),
        "flagged_fraction_before_apply": facts["flagged_fraction"],
        "solution_flag_fraction": {k: q["flag_fraction"] for k, q in quality.items()},
        "bandpass_snr_median": quality["B"]["snr_median"],
        "gain_snr_median": quality["G"]["snr_median"],
        "gain_amp_min": quality["G"]["amp_min"],
        "gain_amp_max": quality["G"]["amp_max"],
        "gain_phase_scatter_deg": _finite_or_none(quality["G"]["phase_scatter_deg"]),
        "good_antenna_fraction": quality["B"]["good_antenna_fraction"],
        "solvestats_unflagged": {k: _unflagged(v) for k, v in stats.items()},
        **corrected,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    write_json_atomic(out / "calibration.json", metrics)
    artifacts = [{"path": p.name, "kind": f"caltable_{k}"} for k, p in tables.items()]
    artifacts += [
        {"path": "model.cl", "kind": "model_componentlist"},
        {"path": "calibration.json", "kind": "calibration_report"},
    ]
    return {"artifacts": artifacts, "metrics": metrics}


def _solve_tables(
    ms: Path,
    tables: dict[str, Path],
    refant: str,
    g0_spw: str,
    minsnr: float,
    params: dict[str, Any],
) -> dict[str, Any]:
    """G0 (phase, per integration, central channels) -> bandpass -> amplitude+phase gains.
    Each step's table is checked as soon as it is written, before the next step uses it:
    CASA reports many failures only as log lines and leaves no table behind."""
    import casatasks as ct

    for path in tables.values():
        shutil.rmtree(path, ignore_errors=True)
    stats = {}
    # A uv-range cut (CASA syntax, e.g. ">100lambda"): the short baselines see the extended
    # emission no point-source model holds; leave them out of the solves where that matters.
    uvrange = str(params.get("uvrange", ""))
    stats["G0"] = ct.gaincal(
        vis=str(ms),
        caltable=str(tables["G0"]),
        calmode="p",
        solint="int",
        refant=refant,
        minsnr=3.0,
        spw=g0_spw,
        uvrange=uvrange,
    )
    check_solutions("gaincal (G0, phase)", tables["G0"])
    stats["B"] = ct.bandpass(
        vis=str(ms),
        caltable=str(tables["B"]),
        solint="inf",
        combine="scan",
        refant=refant,
        gaintable=[str(tables["G0"])],
        minsnr=minsnr,
        solnorm=False,
        uvrange=uvrange,
    )
    check_solutions("bandpass (B)", tables["B"])
    stats["G"] = ct.gaincal(
        vis=str(ms),
        caltable=str(tables["G"]),
        calmode="ap",
        solint=str(params.get("gain_solint", "inf")),
        refant=refant,
        gaintable=[str(tables["B"])],
        minsnr=3.0,
        uvrange=uvrange,
    )
    check_solutions("gaincal (G, amplitude+phase)", tables["G"])
    return stats


def check_solutions(step: str, path: Path) -> None:
    """The table ``step`` should have written exists, has rows, and not every solution is
    flagged; else a recoverable failure naming the step (the next calibration tier)."""
    from casacore.tables import table

    hint = "the solve produced no usable solutions; the next calibration tier is tried"
    if not (path / "table.dat").exists():
        raise StageFailure(
            "recoverable",
            "no_solutions",
            f"{step} wrote no table {path.name} (no usable data or too faint a model?)",
            hint,
        )
    with table(str(path), readonly=True, ack=False) as t:
        rows = t.nrows()
        flagged = float(t.getcol("FLAG").mean()) if rows else 1.0
    if rows == 0 or flagged >= 1.0:
        what = "has no rows" if rows == 0 else f"has all {rows} solution rows flagged"
        raise StageFailure("recoverable", "no_solutions", f"{step}: {path.name} {what}", hint)


def write_model(
    cl_path: Path, model: list[dict[str, Any]], facts: dict[str, Any], dish_m: float
) -> None:
    """A CASA component list of ``model``: sources at their J2000 positions (points, or
    Gaussians where the catalogue gives a size) with a tabular spectrum (catalogue
    spectrum x primary beam) sampled across the MS's band."""
    from casatools import componentlist

    lo, hi = facts["freq_min_hz"], facts["freq_max_hz"]
    freqs = np.linspace(lo - 1e6, hi + 1e6, 33)
    cl = componentlist()
    for i, src in enumerate(model):
        spectrum = apparent_spectrum(src, freqs, dish_m)
        major = float(src.get("major_arcsec") or 0.0)
        shape: dict[str, Any] = {"shape": "point"}
        if major > 0:  # a resolved catalogue source: its deconvolved Gaussian
            shape = {
                "shape": "Gaussian",
                "majoraxis": f"{major}arcsec",
                "minoraxis": f"{max(float(src.get('minor_arcsec') or 0.0), 0.01)}arcsec",
                "positionangle": f"{float(src.get('pa_deg') or 0.0)}deg",
            }
        cl.addcomponent(
            dir=f"J2000 {src['ra_deg']}deg {src['dec_deg']}deg",
            flux=float(np.interp(1.4e9, freqs, spectrum)),
            fluxunit="Jy",
            freq="1.4GHz",
            **shape,
        )
        # LSRK: CASA cannot convert TOPO without a position and epoch; the difference
        # (~1e-4 in frequency) is immaterial for a smooth spectrum.
        cl.setspectrum(
            which=i,
            type="tabular",
            tabularfreqs=freqs.tolist(),
            tabularflux=spectrum.tolist(),
            tabularframe="LSRK",
        )
    cl.rename(str(cl_path))
    cl.close()


def _refuse_faint_calibrator(
    request: dict[str, Any], plan: dict[str, Any], facts: dict[str, Any], minsnr: float
) -> None:
    """Do not solve on a calibrator the data cannot see: the predicted per-channel,
    per-antenna bandpass SNR of its apparent flux must reach ``minsnr``."""
    src = plan["model"][0]
    dish = float(request["telescope"]["dish_diameter_m"])
    centre = np.array([0.5 * (facts["freq_min_hz"] + facts["freq_max_hz"])])
    apparent = float(apparent_spectrum(src, centre, dish)[0])
    n_ant = len(facts["antennas"])
    width = (facts["freq_max_hz"] - facts["freq_min_hz"]) / max(1, facts["n_chan"] - 1)
    duration = float(request.get("obs_duration_s") or 309.0)
    sefd = float(request["telescope"]["sefd_jy"])
    sigma_ant = sefd / math.sqrt(2.0 * width * duration) / math.sqrt(max(1, n_ant - 1))
    snr = apparent / sigma_ant
    if snr < minsnr:
        raise StageFailure(
            "recoverable",
            "calibrator_too_faint",
            f"{src['name']} appears at {apparent:.3g} Jy ({src.get('offset_deg', 0):.2f} deg "
            f"from the pointing centre): predicted bandpass SNR {snr:.1f} < {minsnr:g}",
            "the calibrator is too far out in the primary beam; the next tier is tried",
        )


def _apply_only(request: dict[str, Any], ms: Path, plan: dict[str, Any]) -> dict[str, Any]:

    out = Path(request["output_dir"])
    tables = plan["tables"]
    for tab in tables:
        check_registered_table(Path(tab["path"]))
    facts = _flag_autocorrelations(ms)
    t = time.monotonic()
    _applycal(ms, [tab["path"] for tab in tables], [tab["interp"] for tab in tables])
    _fail_if_casa_skipped_spws(
        request,
        "uncorrected_spw",
        "applycal left spectral windows uncalibrated",
        "the tables do not cover this MS; another set is tried",
    )
    corrected = _corrected_check(ms)
    metrics = {
        "mode": "apply",
        "calibration_set_id": plan.get("set_id"),
        "calibration_tier": plan.get("tier"),
        "calibrator": plan.get("calibrator"),
        "flagged_fraction_before_apply": facts["flagged_fraction"],
        "apply_s": round(time.monotonic() - t, 3),
        **corrected,
    }
    write_json_atomic(out / "calibration.json", {**metrics, "tables": tables})
    return {
        "artifacts": [{"path": "calibration.json", "kind": "calibration_report"}],
        "metrics": metrics,
    }


def check_registered_table(path: Path) -> None:
    """A registered table must exist and read whole (its solutions column, every row)
    before it is applied: applycal on a damaged table fails as if the MS were corrupt, and
    the group would be blamed for the calibration set's fault."""
    from casacore.tables import table

    hint = "the calibration set is marked damaged; another set is tried"
    if not path.exists():
        raise StageFailure(
            "recoverable", "caltable_missing", f"registered table {path} is missing", hint
        )
    try:
        with table(str(path), readonly=True, ack=False) as t:
            column = "CPARAM" if "CPARAM" in t.colnames() else "FPARAM"
            nrows = t.nrows()
            values = t.getcol(column) if nrows else None
    except Exception as exc:  # noqa: BLE001 - casacore raises RuntimeError for any damage
        raise StageFailure(
            "recoverable",
            "caltable_corrupt",
            f"registered table {path} cannot be read: {str(exc)[:300]}",
            hint,
        ) from exc
    if values is None:
        raise StageFailure(
            "recoverable", "caltable_corrupt", f"registered table {path} has no rows", hint
        )


def _flag_autocorrelations(ms: Path) -> dict[str, Any]:
    """Flag the autocorrelations (never used to calibrate or image); return the MS facts,
    refusing an MS with no unflagged cross-correlation left."""
    import casatasks as ct

    ct.flagdata(vis=str(ms), mode="manual", autocorr=True, flagbackup=False)
    facts = inspect_ms(ms)
    if facts["flagged_fraction"] >= 0.999:
        raise StageFailure(
            "validation",
            "all_flagged",
            f"{ms}: every cross-correlation is flagged; nothing to calibrate",
            "the group holds no usable data; quarantined",
        )
    return facts


def _fail_if_casa_skipped_spws(request: dict[str, Any], code: str, what: str, hint: str) -> None:
    """CASA only WARNs "could not be solved/corrected due to missing (pre-)calibration" and
    leaves those spectral windows uncalibrated (REPORT.md §3, pitfall 2): make it an error."""
    skipped = [line for line in casa_log_lines(request.get("casa_log")) if UNSOLVED_RE.search(line)]
    if skipped:
        raise StageFailure("recoverable", code, f"{what}: {skipped[0][-300:]}", hint)


def _applycal(ms: Path, tables: list[str], interp: list[str]) -> None:
    import casatasks as ct

    ct.applycal(vis=str(ms), gaintable=tables, interp=interp, calwt=False, flagbackup=False)


def _corrected_check(ms: Path) -> dict[str, Any]:
    """CORRECTED_DATA must exist and be non-zero where data are unflagged; and it must
    differ from DATA (the old pipeline silently copied DATA into CORRECTED_DATA)."""
    from casacore.tables import table

    with table(str(ms), readonly=True, ack=False) as t:
        if "CORRECTED_DATA" not in t.colnames():
            raise StageFailure(
                "fatal",
                "no_corrected_data",
                f"{ms}: applycal wrote no CORRECTED_DATA column",
                "a CASA problem: inspect the log",
            )
        # Every k-th row, ~20k rows spread over the whole MS: the check sees every part of
        # it without reading two multi-GB columns whole (that was 3 GB at full size).
        step = max(1, t.nrows() // 20_000)
        n = (t.nrows() + step - 1) // step
        corrected = t.getcol("CORRECTED_DATA", 0, n, step)
        data = t.getcol("DATA", 0, n, step)
        flags = t.getcol("FLAG", 0, n, step)
        cross = t.getcol("ANTENNA1", 0, n, step) != t.getcol("ANTENNA2", 0, n, step)
    # Autocorrelations were flagged on purpose: judge the cross-correlations.
    corrected, data, flags = corrected[cross], data[cross], flags[cross]
    good = ~flags
    if not good.any():
        raise StageFailure(
            "validation",
            "all_flagged",
            f"{ms}: every visibility is flagged after applycal",
            "the calibration flagged all data; quarantined",
        )
    nonzero = float(np.count_nonzero(corrected[good]) / good.sum())
    identical = bool(np.allclose(corrected[good], data[good]))
    if nonzero == 0.0 or identical:
        raise StageFailure(
            "recoverable",
            "not_calibrated",
            f"{ms}: CORRECTED_DATA is {'zero' if nonzero == 0 else 'raw DATA'} for unflagged data",
            "never image uncalibrated data; retry a tier",
        )
    return {
        "corrected_nonzero_fraction": nonzero,
        "flagged_fraction_after_apply": float(flags.mean()),
    }


def _central_antenna(facts: dict[str, Any]) -> str:
    """The antenna nearest the array's median position (short baselines to everyone)."""
    pos = np.asarray(facts["antenna_positions_m"])
    centre = np.median(pos, axis=0)
    return facts["antennas"][int(np.argmin(np.linalg.norm(pos - centre, axis=1)))]


def _table_quality(path: Path, exclude: set[int] = frozenset()) -> dict[str, float]:
    """Flag fraction, SNR, amplitude range and phase scatter of a solution table, over the
    antennas not in ``exclude`` (those flagged before the solve)."""
    from casacore.tables import table

    with table(str(path), readonly=True, ack=False) as t:
        flags = t.getcol("FLAG")
        gains = t.getcol("CPARAM")
        snr = t.getcol("SNR")
        ants = t.getcol("ANTENNA1")
    keep = ~np.isin(ants, list(exclude))
    flags, gains, snr, ants = flags[keep], gains[keep], snr[keep], ants[keep]
    good = ~flags
    amps = np.abs(gains[good]) if good.any() else np.array([math.nan])
    per_ant_ok = [good[ants == a].mean() > 0.7 for a in np.unique(ants)]
    return {
        "flag_fraction": float(flags.mean()),
        "snr_median": float(np.median(snr[good])) if good.any() else 0.0,
        "amp_min": float(np.nanmin(amps)),
        "amp_max": float(np.nanmax(amps)),
        # scatter of phases about each antenna's mean (wrapped), over time/channels
        "phase_scatter_deg": _phase_scatter(gains, good, ants),
        "good_antenna_fraction": float(np.mean(per_ant_ok)) if per_ant_ok else 0.0,
    }


def _phase_scatter(gains: np.ndarray, good: np.ndarray, ants: np.ndarray) -> float:
    """Median over (antenna, channel, pol) of the circular scatter of the gain phase over
    time (degrees); NaN when there is one solution per antenna (solint inf). python-casacore
    columns are (row, chan, pol)."""
    scatters = []
    for a in np.unique(ants):
        rows = ants == a
        g, ok = gains[rows], good[rows]
        if g.shape[0] < 2:
            continue
        for c in range(g.shape[1]):
            for p in range(g.shape[2]):
                sel = ok[:, c, p]
                if sel.sum() < 2:
                    continue
                unit = g[sel, c, p] / np.abs(g[sel, c, p])
                r = min(abs(unit.mean()), 1.0)
                scatters.append(np.degrees(np.sqrt(-2 * np.log(max(r, 1e-12)))))
    return float(np.median(scatters)) if scatters else math.nan


def _finite_or_none(value: float) -> float | None:
    """Strict JSON has no NaN: report a missing number as null."""
    return value if math.isfinite(value) else None


def _unflagged(stats: Any) -> Any:
    try:
        return int(np.sum(stats["solvestats"]["data_unflagged"]))
    except (TypeError, KeyError, IndexError):
        return None


if __name__ == "__main__":
    run(stage)
