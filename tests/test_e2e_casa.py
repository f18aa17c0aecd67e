"""End to end with the real CASA stages on small synthetic DSA-110 data (8 antennas x 4
channels x 16 subbands): a calibrator group, a target calibrated from its tables, and three
failure paths (every visibility flagged, a corrupt MS, a missing subband).

One night is run once for the module (about two minutes on 2 cores); the tests read what it
left behind: the state database, the products, and the simulator's truth.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from supervisor import migrate, reconcile
from supervisor.config import load_config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.ingest import Ingestor
from supervisor.models import (
    Artifact,
    CalibrationSet,
    Product,
    QualityAssessment,
    StageAttempt,
    utcnow,
)
from supervisor.science import gain_errors, measure_sources
from supervisor.simulate import Fault, SimulationSpec, simulate
from tests.e2e_night import Night

pytestmark = pytest.mark.casa

CAL, TARGET, FLAGGED, MISSING, CORRUPT = range(5)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Night]:
    ws = tmp_path_factory.mktemp("e2e")
    cwd_before = set(os.listdir("."))
    tmpfs = Path("/dev/shm") if Path("/dev/shm").is_dir() else ws
    faults = tuple(Fault("flagged", FLAGGED, sb) for sb in range(16)) + (Fault("drop", MISSING, 7),)
    truths = simulate(
        ws / "incoming",
        SimulationSpec(
            n_groups=5, calibrator="3C48", calibrator_group=CAL, seed=2026, faults=faults
        ),
    )
    # Production-like: conversion staged in tmpfs when preflight finds room for it; the
    # calibrator's model holds the field from the simulator's survey catalogue (3 % flux
    # and 1" position errors, as a real survey's). The simulator puts each group's field
    # sources within 0.25 deg of its own centre only (another group's sources, ~1 deg
    # away, are not in its sky), so the model is kept to the beam's core here.
    cfg = load_config(
        workspace=ws,
        environ={
            "CONTIMG_PATHS__TMPFS_STAGING": str(tmpfs / f"contimg-e2e-{os.getpid()}"),
            "CONTIMG_CALIBRATION__SKY_CATALOGUE": "incoming/truth/sky_catalogue.csv",
            "CONTIMG_CALIBRATION__SKY_MODEL_MIN_BEAM_GAIN": "0.9",
            "CONTIMG_CALIBRATION__SKY_REFERENCE_MIN_BEAM_GAIN": "0.9",
        },
    )
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    ids = [t.group_id for t in truths]
    daemon = Daemon(cfg, db, rng=random.Random(1))
    corrupted = False
    while True:  # one attempt at a time, so the corrupt-MS group can be damaged mid-way
        before = daemon.summary.attempts
        daemon.run(until_idle=True, max_attempts=before + 1)
        if not corrupted:
            corrupted = _corrupt_after_convert(db, ids[CORRUPT])
        if daemon.summary.attempts == before:
            break
    # The group missing sb07 is still collecting: its deadline passes.
    later = utcnow() + timedelta(seconds=cfg.ingest.group_deadline_s + 1)
    Ingestor(cfg, db, clock=lambda: later).run_once()
    assert corrupted, "the corrupt-MS group never reached convert"
    assert set(os.listdir(".")) == cwd_before, "CASA must not write into the current directory"
    yield Night(cfg, db, ids, ws / "incoming" / "truth")
    shutil.rmtree(cfg.path("tmpfs_staging"), ignore_errors=True)
    db.dispose()


def _corrupt_after_convert(db: Database, group_id: str) -> bool:
    with db.transaction() as s:
        ms = s.scalars(
            select(Artifact.path).where(Artifact.group_id == group_id, Artifact.kind == "ms")
        ).first()
    if ms is None:
        return False
    table_dat = Path(ms) / "table.dat"
    os.truncate(table_dat, table_dat.stat().st_size // 2)
    return True


def test_calibrator_group_completes_with_a_solved_calibration(night: Night) -> None:
    group = night.group(CAL)
    assert (group.state, group.calibrator_name) == ("completed", "3C48")
    with night.db.transaction() as s:
        (cal_set,) = s.scalars(select(CalibrationSet)).all()
        assert (cal_set.group_id, cal_set.calibrator, cal_set.status) == (
            night.ids[CAL],
            "3C48",
            "valid",
        )
        assert cal_set.valid_until - cal_set.valid_from == timedelta(hours=24)
        assert sorted(t.kind for t in cal_set.tables) == ["B", "G", "G0"]
        tiers = set(
            s.scalars(select(Product.calibration_tier).where(Product.group_id == night.ids[CAL]))
        )
    assert tiers == {"self"}


def test_recovered_gains_match_the_injected_ones(night: Night) -> None:
    truth = night.truth(CAL)
    refant = night.metrics(CAL, "calibrate")["refant"]
    caldir = night.artifact(CAL, "caltable_B").parent
    errors = gain_errors(
        caldir, night.truth_dir / f"{night.ids[CAL]}.npz", truth["antenna_names"].index(refant)
    )
    # AOFlagger's few false positives can leave a bandpass channel unsolved (measured 0.4 %).
    assert errors["flagged_fraction"] < 0.01
    assert errors["amp_err_rms_pct"] < 2.0
    assert errors["phase_err_rms_deg"] < 2.0


def test_calibrator_flux_and_image_noise(night: Night) -> None:
    image = night.metrics(CAL, "image")
    assert image["calibrator_flux_method"] == "gaussian_fit"
    assert abs(image["calibrator_flux_ratio"] - 1.0) < 0.02
    assert 0.5 <= image["rms_over_theory"] <= 2.0
    assert image["psf_peak"] > 0 and image["gridded_weight"] > 0 and image["image_finite"]
    # The whole primary beam, on the imager this machine has (WSClean where installed).
    assert image["imager"] == ("wsclean" if shutil.which("wsclean") else "tclean")
    assert 3.5 <= image["field_deg"] < 3.6
    assert image["smearing_loss_at_edge"] <= image["smearing_loss_limit"] or image["chan_avg"] == 1


def test_field_sources_of_the_calibrator_group_keep_most_of_their_flux(night: Night) -> None:
    """With the field in the calibration model the gains absorb less of the calibrator
    field's other sources: measured 0.67-0.85 of their flux on this 8-antenna array (with
    the calibrator alone and tclean: 0.35-0.60). Not yet the 5 % of a target field (see
    README, Known limits)."""
    calib = night.metrics(CAL, "calibrate")
    assert calib["model_sources"] == 4 and calib["sky_model"].endswith("sky_catalogue.csv")
    fits = night.artifact(CAL, "image_fits")
    sources = [
        s
        for s in measure_sources(fits, night.truth_dir / f"{night.ids[CAL]}.json")
        if s["name"] != "3C48"
    ]
    assert len(sources) == 3
    ratios = [src["ratio"] for src in sources]
    assert min(ratios) > 0.6 and sum(ratios) / 3 > 0.7 and max(ratios) < 1.1, sources


def test_target_is_calibrated_from_the_calibrators_tables(night: Night) -> None:
    group = night.group(TARGET)
    assert group.state == "completed" and not group.is_calibrator
    calib = night.metrics(TARGET, "calibrate")
    assert (calib["mode"], calib["calibration_tier"], calib["calibrator"]) == (
        "apply",
        "valid_window",
        "3C48",
    )
    assert calib["corrected_nonzero_fraction"] == 1.0
    with night.db.transaction() as s:
        products = {
            p.kind: p
            for p in s.scalars(select(Product).where(Product.group_id == night.ids[TARGET]))
        }
        verdicts = {
            row.stage: row.verdict
            for row in s.scalars(
                select(QualityAssessment).where(QualityAssessment.group_id == night.ids[TARGET])
            )
        }
    assert set(products) == {
        "ms",
        "image_fits",
        "image_pbcor_fits",
        "image_png",
        "source_catalogue",
        "qa",
    }
    assert {p.calibration_tier for p in products.values()} == {"valid_window"}
    assert all(Path(p.path).exists() for p in products.values() if p.path)
    assert Path(products["image_png"].path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert verdicts["convert"] == verdicts["calibrate"] == "pass"
    # The 8-antenna test array's Briggs-0 beam is ~3:1 (WSClean 55" x 17", tclean 54" x
    # 22"): the beam-shape metric may warn; every other image metric passes.
    with night.db.transaction() as s:
        image_qa = s.scalars(
            select(QualityAssessment).where(
                QualityAssessment.group_id == night.ids[TARGET], QualityAssessment.stage == "image"
            )
        ).one()
    not_passing = {k for k, v in image_qa.metrics.items() if v["verdict"] != "pass"}
    assert not_passing <= {"beam_axis_ratio"}, image_qa.metrics


def test_completed_groups_agree_with_their_disk(night: Night) -> None:
    # calibrate writes MODEL_DATA/CORRECTED_DATA into the convert MS: its commit records the
    # MS's new size, so the state check does not take a calibrated MS for a damaged one.
    findings = reconcile.check_state(night.cfg, night.db)
    done = {night.ids[CAL], night.ids[TARGET]}
    assert [f.as_dict() for f in findings if f.group_id in done] == []


def test_target_source_catalogue_matches_the_sky_catalogue(night: Night) -> None:
    """PyBDSF's catalogue of the target image against the survey catalogue the simulator
    wrote (3 % flux, 1" position errors): every expected source found, flux and astrometry
    scored by the image gate."""
    image = night.metrics(TARGET, "image")
    assert image["source_finder"].startswith("pybdsf")
    assert image["catalogue_expected_5sigma"] == image["catalogue_matched"] == 3
    assert image["catalogue_missed"] == 0
    assert abs(image["catalogue_flux_ratio_median"] - 1.0) < 0.1
    assert image["astrometry_offset_arcsec_median"] < 5.0
    rows = night.artifact(TARGET, "source_catalogue").read_text().splitlines()
    header = [r for r in rows if not r.startswith("#")][0].split(",")
    assert header[:3] == ["source_id", "ra_deg", "dec_deg"]
    with night.db.transaction() as s:
        qa = s.scalars(
            select(QualityAssessment).where(
                QualityAssessment.group_id == night.ids[TARGET], QualityAssessment.stage == "image"
            )
        ).one()
    assert {"catalogue_flux_error", "astrometry_offset_arcsec"} <= set(qa.metrics)


def test_target_sources_fluxes_positions_and_noise(night: Night) -> None:
    fits = night.artifact(TARGET, "image_fits")
    sources = measure_sources(fits, night.truth_dir / f"{night.ids[TARGET]}.json")
    assert len(sources) == 3
    for src in sources:
        assert abs(src["ratio"] - 1.0) < 0.10, src
        assert src["offset_pix"] < 1.0, src
    image = night.metrics(TARGET, "image")
    assert 0.5 <= image["rms_over_theory"] <= 2.0


def test_measurement_set_is_what_casa_needs(night: Night) -> None:
    from casacore.tables import table

    ms = night.artifact(TARGET, "ms")
    convert = night.metrics(TARGET, "convert")
    assert (convert["n_spw"], convert["n_chan"]) == (1, 64)
    # No interference was injected: AOFlagger's false positives on Gaussian noise only
    # (measured 0.08 %), no antenna flagged.
    assert convert["flagged_fraction"] < 0.02 and convert["antennas_flagged"] == {}
    assert convert["flagger"] == "aoflagger"
    assert convert["staged_in"] == night.metrics(TARGET, "preflight")["staging"]
    tmpfs = night.cfg.path("tmpfs_staging")
    assert not tmpfs.exists() or not any(tmpfs.iterdir()), "tmpfs staging left behind"
    with table(str(ms / "SPECTRAL_WINDOW"), ack=False) as spw:
        freqs = spw.getcell("CHAN_FREQ", 0)
    assert (freqs[1:] > freqs[:-1]).all() and 1.311e9 < freqs[0] < freqs[-1] < 1.499e9
    with table(str(ms / "OBSERVATION"), ack=False) as obs:
        assert obs.getcol("TELESCOPE_NAME")[0] == "OVRO_MMA"
        assert obs.getkeyword("CONTIMG_TELESCOPE_IDENTITY") == "DSA-110"
    with table(str(ms), ack=False) as t:
        assert "CORRECTED_DATA" in t.colnames()


def test_all_flagged_group_is_quarantined_by_the_convert_gate(night: Night) -> None:
    group = night.group(FLAGGED)
    assert (group.state, group.stage, group.error_category, group.error_code) == (
        "quarantined",
        "convert",
        "validation",
        "convert_gate_failed",
    )
    assert "flagged_fraction=1" in group.state_reason
    with night.db.transaction() as s:
        qa = s.scalars(
            select(QualityAssessment).where(QualityAssessment.group_id == night.ids[FLAGGED])
        ).one()
    assert (qa.stage, qa.verdict) == ("convert", "fail") and qa.score <= 0.33
    assert not (night.cfg.path("products") / night.ids[FLAGGED] / "convert").exists()


def test_corrupt_measurement_set_fails_with_a_hint(night: Night) -> None:
    group = night.group(CORRUPT)
    assert (group.state, group.stage, group.error_category, group.error_code) == (
        "failed",
        "calibrate",
        "fatal",
        "corrupt_table",
    )
    assert "Unable to open MS" in group.state_reason or "readBlock" in group.state_reason
    with night.db.transaction() as s:
        attempt = s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == night.ids[CORRUPT], StageAttempt.stage == "calibrate"
            )
        ).one()
    assert "requeue GROUP --from-stage convert" in attempt.hint


def test_missing_subband_is_quarantined_naming_it(night: Night) -> None:
    group = night.group(MISSING)
    assert (group.state, group.error_code) == ("quarantined", "incomplete_group")
    assert "sb07" in group.state_reason


def test_no_staging_left_and_casa_logs_are_in_attempt_directories(night: Night) -> None:
    staging = night.cfg.path("staging")
    assert not staging.exists() or not any(staging.rglob("*"))
    logs = list(Path(night.cfg.workspace).rglob("casa*.log"))
    assert logs and all(p.name == "casa.log" and "logs" in p.parts for p in logs)
    with night.db.transaction() as s:
        running = s.scalar(
            select(func.count()).select_from(StageAttempt).where(StageAttempt.outcome == "running")
        )
    assert running == 0


def test_demo_summary_has_what_an_operator_needs(night: Night) -> None:
    from supervisor.demo import render_table, summarise

    summary = summarise(night.db)
    rows = {g["group_id"]: g for g in summary["groups"]}
    cal, target = rows[night.ids[CAL]], rows[night.ids[TARGET]]
    for row in (cal, target):
        assert {
            "group_id",
            "state",
            "calibration_tier",
            "rms_over_theory",
            "calibrator_flux_ratio",
            "fits",
            "png",
            "stage_seconds",
        } <= set(row)
        assert Path(row["fits"]).exists() and Path(row["png"]).exists()
        assert set(row["stage_seconds"]) == {
            "preflight",
            "convert",
            "calibrate",
            "image",
            "register",
        }
    assert (cal["calibration_tier"], target["calibration_tier"]) == ("self", "valid_window")
    assert abs(cal["calibrator_flux_ratio"] - 1) < 0.02 and target["calibrator_flux_ratio"] is None
    assert rows[night.ids[FLAGGED]]["reason"].startswith("convert failed its quality gate")
    text = render_table({**summary, "workspace": "W", "wall_s": 1.0, "simulate_s": 0.5})
    assert night.ids[TARGET] in text and "valid_window" in text


def _run_calibrate_worker(night: Night, tmp: Path, model_flux_jy: float, minsnr: float) -> dict:
    """The real calibrate worker on a copy of the calibrator group's MS, asked to solve on a
    model of ``model_flux_jy``; returns its result record."""
    import subprocess
    import sys

    from supervisor.casaenv import casa_environment, write_site_config

    ms = tmp / "copy.ms"
    shutil.copytree(night.artifact(CAL, "ms"), ms)
    out, work = tmp / "out", tmp / "work"
    out.mkdir()
    work.mkdir()
    request = {
        "group_id": night.ids[CAL],
        "stage": "calibrate",
        "attempt": 1,
        "tier": {"index": 0, "name": "primary", "params": {"minsnr": minsnr}},
        "artifacts": {"ms": str(ms)},
        "output_dir": str(out),
        "result_path": str(work / "result.json"),
        "casa_log": str(work / "casa.log"),
        "obs_duration_s": 309.0,
        "telescope": {"dish_diameter_m": 4.65, "sefd_jy": 6500.0},
        "calibration_plan": {
            "mode": "solve",
            "tier": "self",
            "calibrator": "3C48",
            "model": [
                {
                    "name": "3C48",
                    "ra_deg": 24.422081,
                    "dec_deg": 33.159759,
                    "flux_jy_1p4ghz": model_flux_jy,
                    "apparent_flux_jy_1p4ghz": model_flux_jy,
                    "spectral_index": -0.7,
                    "offset_deg": 0.0,
                }
            ],
        },
    }
    path = work / "request.json"
    path.write_text(json.dumps(request))
    site = write_site_config(work, work / "casa.log")
    subprocess.run(
        [sys.executable, "-m", "stages.calibrate", "--request", str(path)],
        cwd=work,
        env=casa_environment(site),
        timeout=600,
        check=False,
        capture_output=True,
    )
    return json.loads((work / "result.json").read_text())


def test_a_solve_step_that_writes_no_table_is_classified_naming_the_step(
    night: Night, tmp_path: Path
) -> None:
    """A calibrator model that is practically zero (3C48 far out in the beam): the solve
    steps find nothing; the step's own check names it and classifies it as recoverable
    (the next calibration tier), instead of a later step raising `Table ... does not exist`
    as an unclassified fatal error."""
    result = _run_calibrate_worker(night, tmp_path, model_flux_jy=1.6e-27, minsnr=0.0)
    error = result["error"]
    assert (result["status"], error["category"], error["code"]) == (
        "failed",
        "recoverable",
        "no_solutions",
    )
    assert any(step in error["message"] for step in ("gaincal (G0", "bandpass (B)", "gaincal (G,"))


def test_a_calibrator_too_faint_to_solve_on_is_refused_before_solving(
    night: Night, tmp_path: Path
) -> None:
    result = _run_calibrate_worker(night, tmp_path, model_flux_jy=1.6e-27, minsnr=5.0)
    error = result["error"]
    assert (error["category"], error["code"]) == ("recoverable", "calibrator_too_faint")
    assert "predicted bandpass SNR" in error["message"] and "3C48" in error["message"]
    assert not (tmp_path / "out" / "B.bcal").exists()


def _run_image_worker(night: Night, tmp: Path, params: dict) -> dict:
    """The real image worker on the target group's committed (calibrated) MS with the
    tier ``params``; returns its result record."""
    return night.rerun_worker(TARGET, "image", tmp, params)


def test_without_wsclean_the_same_products_come_from_tclean(night: Night, tmp_path: Path) -> None:
    """imager = auto with no WSClean: tclean makes the same products, judged by the same
    QA, and the metrics say which imager and why; it leaves the committed MS unchanged."""
    result = _run_image_worker(
        night, tmp_path, {"imager": "auto", "wsclean": str(tmp_path / "no-such-wsclean")}
    )
    assert result["status"] == "succeeded", result.get("error")
    metrics = result["metrics"]
    assert metrics["imager"] == "tclean" and "not found" in metrics["imager_note"]
    assert 0.5 <= metrics["rms_over_theory"] <= 2.0
    assert {a["kind"] for a in result["artifacts"]} == {
        "image_fits",
        "image_pbcor_fits",
        "image_png",
        "psf_fits",
        "source_catalogue",
    }
    sources = measure_sources(
        tmp_path / "out" / "image.fits", night.truth_dir / f"{night.ids[TARGET]}.json"
    )
    assert len(sources) == 3 and all(abs(src["ratio"] - 1.0) < 0.10 for src in sources)
    # tclean read the committed MS (or mstransform did, for an averaged copy in scratch):
    # the MS is still as its rows record it.
    findings = reconcile.check_state(night.cfg, night.db)
    assert [f.as_dict() for f in findings if f.group_id == night.ids[TARGET]] == []


def test_a_failing_wsclean_is_a_classified_failure_for_the_tclean_tier(
    night: Night, tmp_path: Path
) -> None:
    broken = tmp_path / "wsclean"
    broken.write_text("#!/bin/sh\necho 'Error: simulated casacore exception' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = _run_image_worker(night, tmp_path, {"imager": "wsclean", "wsclean": str(broken)})
    error = result["error"]
    assert (result["status"], error["category"], error["code"]) == (
        "failed",
        "recoverable",
        "wsclean_failed",
    )
    assert "simulated casacore exception" in error["message"] and "exited 1" in error["message"]
    (tmp_path / "required").mkdir()
    required = _run_image_worker(
        night, tmp_path / "required", {"imager": "wsclean", "wsclean": str(tmp_path / "none")}
    )
    assert required["error"]["code"] == "imager_unavailable"


def test_the_primary_beam_corrected_image_divides_by_the_drift_averaged_beam(
    night: Night,
) -> None:
    from astropy.io import fits as pyfits

    flat = np.squeeze(pyfits.getdata(night.artifact(TARGET, "image_fits")))
    pbcor = np.squeeze(pyfits.getdata(night.artifact(TARGET, "image_pbcor_fits")))
    ny, nx = flat.shape
    centre = (ny // 2, nx // 2)
    ratio = flat / pbcor
    finite = np.isfinite(ratio) & (np.abs(flat) > 0)
    # At the centre: the Gaussian beam (FWHM ~2.9 deg at 1.4 GHz) averaged over the 309 s
    # drift (1.08 deg of RA at dec +33): ~0.96, the most anywhere; it falls off outwards.
    dec = math.radians(night.truth(TARGET)["pointing_dec_deg"])
    fwhm = math.degrees(1.03 * 299_792_458.0 / 1.405e9 / 4.65)
    drift = np.linspace(-0.5, 0.5, 2001) * 309.0 * 360.98564736629 / 86400 * math.cos(dec)
    expected = float(np.mean(np.exp(-4 * math.log(2) * (drift / fwhm) ** 2)))
    assert ratio[centre] == pytest.approx(expected, abs=0.01)
    assert ratio[finite].max() <= ratio[centre] + 1e-3
    assert ratio[finite].min() < 0.5
    assert np.isnan(pbcor).any() == (night.metrics(TARGET, "image")["pb_blanked_fraction"] > 0)
