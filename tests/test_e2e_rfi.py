"""End to end through the real CASA stages with interference and a dead antenna (8
antennas x 4 channels x 16 subbands): a calibrator group and a target, both with narrow-band
channels, broadband bursts and a few interfered baselines, and one dead antenna (noisy
antennas: tests/test_flagging.py). The flags are scored against the simulator's truth; the
science keeps its bounds where the 7-antenna array allows (see the target test).

One night is run once for the module (under a minute on 2 cores).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from stages import flagging
from supervisor import migrate
from supervisor.config import load_config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group, QualityAssessment
from supervisor.science import flag_accuracy, gain_errors, measure_sources
from supervisor.simulate import SimulationSpec, simulate
from tests.e2e_night import Night

pytestmark = pytest.mark.casa

CAL, TARGET = 0, 1
DEAD = 2  # antenna index: DSA003


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Night]:
    ws = tmp_path_factory.mktemp("e2e-rfi")
    truths = simulate(
        ws / "incoming",
        SimulationSpec(
            n_groups=2,
            calibrator="3C48",
            calibrator_group=CAL,
            seed=2026,
            rfi=True,
            dead_antennas=(DEAD,),
        ),
    )
    # The sky and gains of test_e2e_casa.py's night (seed 2026; interference has its own
    # random stream), so that its bounds apply. As in production, the calibrator's model
    # holds the field from the survey catalogue.
    cfg = load_config(
        workspace=ws,
        environ={
            "CONTIMG_CALIBRATION__SKY_CATALOGUE": "incoming/truth/sky_catalogue.csv",
            "CONTIMG_CALIBRATION__SKY_MODEL_MIN_BEAM_GAIN": "0.9",
            "CONTIMG_CALIBRATION__SKY_REFERENCE_MIN_BEAM_GAIN": "0.9",
        },
    )
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    Daemon(cfg, db, rng=random.Random(1)).run(until_idle=True)
    yield Night(cfg, db, [t.group_id for t in truths], ws / "incoming" / "truth")
    db.dispose()


def test_both_groups_complete_and_the_gates_see_the_flags(night: Night) -> None:
    with night.db.transaction() as s:
        states = [s.get(Group, gid).state for gid in night.ids]
        verdicts = {
            (qa.group_id, qa.stage): qa
            for qa in s.scalars(
                select(QualityAssessment).where(QualityAssessment.stage == "convert")
            )
        }
    assert states == ["completed", "completed"]
    for gid in night.ids:
        metrics = verdicts[(gid, "convert")].metrics
        assert {"rfi_flagged_fraction", "broken_antenna_fraction"} <= set(metrics)
        # 1 of 8 antennas broken is more than 5 % of the array: the gate warns.
        assert metrics["broken_antenna_fraction"]["verdict"] == "warn"


@pytest.mark.parametrize("index", [CAL, TARGET])
def test_flags_catch_the_interference_and_keep_the_clean_data(night: Night, index: int) -> None:
    convert = night.metrics(index, "convert")
    assert convert["flagger"] == ("aoflagger" if _has_aoflagger() else "flagdata")
    assert set(convert["antennas_flagged"]) == {"DSA003"}
    assert convert["antennas_flagged"]["DSA003"].startswith("dead")
    assert len(convert["rfi_flagged_fraction_per_subband"]) == 16
    assert convert["flagged_fraction_per_antenna"]["DSA003"] == 1.0
    score = flag_accuracy(night.artifact(index, "ms"), night.truth(index))
    assert score.injected_samples > 0
    assert score.injected_flagged >= 0.95, score
    assert score.clean_lost < 0.05, score
    assert score.dead_flagged == score.dead_injected == 1


def test_gains_of_the_working_antennas_match_and_the_dead_one_has_none(night: Night) -> None:
    truth = night.truth(CAL)
    calib = night.metrics(CAL, "calibrate")
    assert calib["antennas_flagged_upstream"] == ["DSA003"]
    assert calib["solution_flag_fraction"]["B"] < 0.1  # of the working antennas
    caldir = night.artifact(CAL, "caltable_B").parent
    errors = gain_errors(
        caldir,
        night.truth_dir / f"{night.ids[CAL]}.npz",
        truth["antenna_names"].index(calib["refant"]),
    )
    # Six working antennas of eight, a tenth of the data flagged: the noise-limited gain
    # error grows (measured 2.2 % and 0.8 deg; the clean 8-antenna night's bound is 2 / 2).
    assert errors["amp_err_rms_pct"] < 3.0 and errors["phase_err_rms_deg"] < 2.0, errors
    from casacore.tables import table

    with table(str(caldir / "B.bcal"), readonly=True, ack=False) as t:
        ants, flags = t.getcol("ANTENNA1"), t.getcol("FLAG")
    assert flags[ants == DEAD].all(), "the dead antenna must have no bandpass solutions"


def test_calibrator_flux_and_target_sources_keep_their_bounds(night: Night) -> None:
    image = night.metrics(CAL, "image")
    assert abs(image["calibrator_flux_ratio"] - 1.0) < 0.02
    assert 0.5 <= image["rms_over_theory"] <= 2.0
    sources = measure_sources(
        night.artifact(TARGET, "image_fits"), night.truth_dir / f"{night.ids[TARGET]}.json"
    )
    # One antenna of eight flagged: CLEAN on a 7-antenna snapshot spreads a source's
    # components over arcminutes, so the peak fit finds less than its flux. Imaging the
    # simulator's noiseless true sky (DATA, no gains) with that antenna flagged gives the
    # same 0.78 of flux for two of these sources (measured; with all eight, 0.93-0.98):
    # the array, not the flagging or the calibration. At 96 antennas this does not arise.
    assert len(sources) == 3
    for src in sources:
        assert 0.7 < src["ratio"] < 1.1, src
        assert src["offset_pix"] < 1.0, src
    assert 0.5 <= night.metrics(TARGET, "image")["rms_over_theory"] <= 2.0


def test_the_flagdata_tier_flags_the_same_interference(night: Night, tmp_path: Path) -> None:
    """The real convert worker on the calibrator group's files with the fallback tier's
    flagger: CASA tfcrop + rflag on the written MS, the same statistics."""
    result = night.rerun_worker(
        CAL, "convert", tmp_path, {"flagger": "flagdata"}, tmpfs_staging=None
    )
    assert result["status"] == "succeeded", result
    metrics = result["metrics"]
    assert metrics["flagger"] == "flagdata"
    assert set(metrics["antennas_flagged"]) == {"DSA003"}
    score = flag_accuracy(tmp_path / "out" / result["artifacts"][0]["path"], night.truth(CAL))
    # CASA's flaggers find narrow-band and single-baseline interference as well as
    # AOFlagger, but miss a good part of the weak broadband bursts (measured: 0.78 of them
    # found) and lose far more clean data (measured 0.18 on this bright calibrator's field,
    # AOFlagger 0.02): the fallback, not the primary.
    assert score.by_kind["channels"] >= 0.95 and score.by_kind["baselines"] >= 0.95, score
    assert score.injected_flagged >= 0.5, score
    assert score.clean_lost < 0.25, score
    assert score.dead_flagged == score.dead_injected == 1


def test_without_the_aoflagger_module_auto_means_flagdata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aoflagger", None)  # import raises ImportError
    assert flagging.choose_flagger("auto") == "flagdata"
    assert flagging.choose_flagger("none") == "none"
    with pytest.raises(flagging.StageFailure) as err:
        flagging.choose_flagger("sumthreshold")
    assert err.value.code == "bad_tier_params"


def _has_aoflagger() -> bool:
    try:
        import aoflagger  # noqa: F401
    except ImportError:
        return False
    return True
