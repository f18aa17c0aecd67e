"""The field sky model: a strict catalogue reader (a malformed line is a configuration error
naming it, found by `config check`), the selection of field sources for a calibrator's
model, and the simulator's catalogue with a real survey's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervisor import calibration, migrate
from supervisor.config import ConfigError, load_config
from supervisor.db import Database
from supervisor.models import Group
from supervisor.skymodel import CatalogueError, field_model, read_catalogue
from tests.conftest import add_pending_group

GOOD = """# a survey extract
name,ra_deg,dec_deg,flux_mjy,spectral_index,major_arcsec,minor_arcsec,pa_deg
A,24.50,33.20,250.0,-0.8,,,
B,24.40,33.00,12.5,,20,10,45
C,30.00,33.10,900,-0.7,,,
"""


def test_a_good_catalogue_reads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "sky.csv"
    path.write_text(GOOD)
    a, b, c = read_catalogue(path)
    assert (a.name, a.flux_jy_1p4ghz, a.spectral_index, a.major_arcsec) == ("A", 0.25, -0.8, 0)
    assert (b.spectral_index, b.major_arcsec, b.minor_arcsec, b.pa_deg) == (-0.7, 20, 10, 45)
    assert c.flux_jy_1p4ghz == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ra_deg,dec_deg\n1,2\n", ":1: header ['ra_deg', 'dec_deg']: missing columns ['flux_mjy']"),
        ("ra_deg,dec_deg,flux_mjy,size\n1,2,3,4\n", "unknown columns ['size']"),
        ("#c\nra_deg,dec_deg,flux_mjy\n1,2,x\n", ":3: flux_mjy = 'x': not a number"),
        ("ra_deg,dec_deg,flux_mjy\n1,95,3\n", ":2: dec_deg = 95: must be finite, within -90..90"),
        ("ra_deg,dec_deg,flux_mjy\n1,2,nan\n", ":2: flux_mjy = nan: must be finite"),
        ("ra_deg,dec_deg,flux_mjy\n1,2,0\n", ":2: flux_mjy = 0: must be positive"),
        ("ra_deg,dec_deg,flux_mjy\n1,2\n", ":2: 2 fields, the header has 3"),
        (
            "ra_deg,dec_deg,flux_mjy,major_arcsec,minor_arcsec\n1,2,3,5,9\n",
            ":2: minor_arcsec 9 > major_arcsec 5",
        ),
        ("# only comments\n", "no header line"),
    ],
)
def test_a_malformed_catalogue_names_the_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "sky.csv"
    path.write_text(text)
    with pytest.raises(CatalogueError) as caught:
        read_catalogue(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_config_check_finds_a_malformed_catalogue(tmp_path: Path) -> None:
    (tmp_path / "sky.csv").write_text("ra_deg,dec_deg,flux_mjy\n1,2,3\n4,5,oops\n")
    conf = tmp_path / "site.toml"
    conf.write_text('[calibration]\nsky_catalogue = "sky.csv"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(conf, workspace=tmp_path, environ={})
    assert "sky.csv:3: flux_mjy = 'oops': not a number" in str(caught.value)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "contimg-supervisor"), "config", "check", str(conf)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")},
    )
    assert done.returncode == 2 and "sky.csv:3: flux_mjy = 'oops'" in done.stderr
    conf.write_text('[calibration]\nsky_catalogue = "missing.csv"\n')
    with pytest.raises(ConfigError, match="missing.csv'?: no such file"):
        load_config(conf, workspace=tmp_path, environ={})


def test_field_model_keeps_what_the_beam_sees_brightest_first(tmp_path: Path) -> None:
    path = tmp_path / "sky.csv"
    path.write_text(
        "name,ra_deg,dec_deg,flux_mjy\n"
        "centre,24.42,33.16,15670\n"  # the calibrator itself (also in the survey)
        "near,24.60,33.30,200\n"
        "edge,24.42,35.20,500\n"  # 2 deg off: beam gain ~0.35
        "faint,24.30,33.10,5\n"  # 5 mJy: below 10 mJy apparent
        "outside,24.42,37.50,9000\n"  # 4.3 deg off: below the beam cut
    )
    model = field_model(
        read_catalogue(path),
        24.42,
        33.16,
        dish_m=4.65,
        min_beam_gain=0.05,
        min_apparent_jy=0.01,
        max_sources=10,
        exclude=((24.422081, 33.159759),),
    )
    assert [m["name"] for m in model] == ["near", "edge"]  # by apparent flux: 0.20, 0.17 Jy
    edge = model[1]
    assert 0.2 < edge["pb_gain_1p4ghz"] < 0.5 and edge["offset_deg"] == pytest.approx(2.04, 0.01)
    assert edge["apparent_flux_jy_1p4ghz"] == pytest.approx(0.5 * edge["pb_gain_1p4ghz"])
    brightest = field_model(
        read_catalogue(path), 24.42, 33.16, dish_m=4.65, min_beam_gain=0.05,
        min_apparent_jy=0.01, max_sources=1,
    )  # fmt: skip
    assert [m["name"] for m in brightest] == ["centre"]  # nothing excluded here


def test_the_solve_plan_carries_the_field_when_a_catalogue_is_configured(
    tmp_path: Path,
) -> None:
    from supervisor.calibrators import load_catalogue, lst_deg
    from supervisor.simulate import INTEGRATION_S, first_transit_after

    ws = tmp_path / "ws"
    (ws / "incoming").mkdir(parents=True)
    cal = next(c for c in load_catalogue() if c.name == "3C48")
    transit = first_transit_after(cal, datetime(2025, 10, 5, tzinfo=UTC), -118.2825)
    start = (transit - timedelta(seconds=12 * INTEGRATION_S)).strftime("%Y-%m-%dT%H:%M:%S")
    mid = datetime.strptime(start, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC) + timedelta(
        seconds=12 * INTEGRATION_S
    )
    ra = lst_deg(mid, -118.2825)
    (ws / "sky.csv").write_text(
        f"name,ra_deg,dec_deg,flux_mjy\nfield1,{ra + 0.3:.5f},{cal.dec_deg + 0.2:.5f},300\n"
    )
    for catalogue, expected in (("", ["3C48"]), ("sky.csv", ["3C48", "field1"])):
        env = {"CONTIMG_CALIBRATION__SKY_CATALOGUE": catalogue} if catalogue else {}
        cfg = load_config(workspace=ws, environ=env)
        db = Database(cfg.database_url)
        migrate.upgrade(db)
        if catalogue == "":
            add_pending_group(db, start)
        with db.transaction() as s:
            group = s.get(Group, start)
            group.pointing_dec_deg = cal.dec_deg
            plan = calibration.plan_for(s, group, cfg)
        db.dispose()
        assert [m["name"] for m in plan.model] == expected
        assert plan.as_request()["sky_model"] == (str(ws / catalogue) if catalogue else None)


def test_the_simulator_writes_a_catalogue_with_survey_errors(tmp_path: Path) -> None:
    from supervisor.simulate import SimulationSpec, simulate

    truths = simulate(
        tmp_path, SimulationSpec(n_groups=2, calibrator="3C48", seed=5, n_field_sources=4)
    )
    catalogue = read_catalogue(tmp_path / "truth" / "sky_catalogue.csv")
    injected = [s for t in truths for s in t.sources if s["name"] != "3C48"]
    assert len(catalogue) == len(injected) == 8
    assert "3C48" not in {c.name for c in catalogue}
    for src, entry in zip(injected, catalogue, strict=True):
        ratio = entry.flux_jy_1p4ghz / src["flux_jy_1p4ghz"]
        offset = 3600 * math.hypot(
            (entry.ra_deg - src["ra_deg"]) * math.cos(math.radians(src["dec_deg"])),
            entry.dec_deg - src["dec_deg"],
        )
        assert 0.85 < ratio < 1.15 and ratio != 1.0  # errors, of a survey's size
        assert 0 < offset < 6.0
    truth = json.loads((tmp_path / "truth" / f"{truths[0].group_id}.json").read_text())
    assert truth["sources"]  # the per-group truth is unchanged beside it
