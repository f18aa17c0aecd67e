"""The demo: simulate a short night (a calibrator group, then target groups), run the real
daemon with the real CASA stages until the queue drains, and summarise what came out."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from supervisor import migrate
from supervisor.config import Config, load_config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group, Product, StageAttempt
from supervisor.simulate import SimulationSpec, simulate

MARKER = ".contimg-demo"
DEMO_DIRS = ("incoming", "state", "products", "staging", "logs")


class DemoError(Exception):
    pass


def prepare_workspace(workspace: Path | None) -> Path:
    """A clean demo workspace: a new temporary one, or ``workspace`` (only wiped if it is
    empty or an earlier demo's, so the demo never deletes anything else)."""
    if workspace is None:
        ws = Path(tempfile.mkdtemp(prefix="contimg-demo-"))
    else:
        ws = workspace.resolve()
        if ws.exists() and any(ws.iterdir()) and not (ws / MARKER).exists():
            raise DemoError(f"{ws} is not empty and not a demo workspace; refusing to use it")
        for name in DEMO_DIRS:
            shutil.rmtree(ws / name, ignore_errors=True)
    ws.mkdir(parents=True, exist_ok=True)
    (ws / MARKER).write_text("created by contimg-supervisor demo\n")
    return ws


def demo_config(base: Config, workspace: Path) -> Config:
    """The configuration with demo-friendly timings (short polls and stability waits)."""
    return dataclasses.replace(
        base,
        workspace=str(workspace),
        ingest=dataclasses.replace(base.ingest, stability_interval_s=0.5, poll_interval_s=1.0),
        daemon=dataclasses.replace(base.daemon, idle_poll_s=0.5),
    )


def run_demo(
    cfg_file: str | None, workspace: Path | None, *, n_groups: int = 4, seed: int = 11
) -> dict[str, Any]:
    ws = prepare_workspace(workspace)
    cfg = demo_config(load_config(cfg_file, workspace=ws), ws)
    started = time.monotonic()
    truths = simulate(
        ws / "incoming",
        SimulationSpec(
            n_groups=n_groups,
            calibrator="3C48",
            calibrator_group=0,
            seed=seed,
            sefd_jy=cfg.telescope.sefd_jy,
            latitude_deg=cfg.telescope.latitude_deg,
            longitude_deg=cfg.telescope.longitude_deg,
            altitude_m=cfg.telescope.altitude_m,
            dish_diameter_m=cfg.telescope.dish_diameter_m,
        ),
    )
    simulate_s = time.monotonic() - started
    db = Database(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)
    migrate.upgrade(db)
    Daemon(cfg, db).run(until_idle=True)
    summary = summarise(db)
    summary.update(
        workspace=str(ws),
        simulated_groups=[t.group_id for t in truths],
        simulate_s=round(simulate_s, 1),
        wall_s=round(time.monotonic() - started, 1),
    )
    db.dispose()
    return summary


def summarise(db: Database) -> dict[str, Any]:
    rows = []
    with db.transaction() as s:
        for group in s.scalars(select(Group).order_by(Group.obs_start)):
            products = {
                p.kind: p
                for p in s.scalars(select(Product).where(Product.group_id == group.group_id))
            }
            timings: dict[str, float] = {}
            for a in s.scalars(
                select(StageAttempt).where(
                    StageAttempt.group_id == group.group_id, StageAttempt.outcome == "succeeded"
                )
            ):
                if a.finished_at is not None:
                    timings[a.stage] = round((a.finished_at - a.started_at).total_seconds(), 1)
            image = (products["qa"].metrics or {}).get("image", {}) if "qa" in products else {}
            tier = next((p.calibration_tier for p in products.values()), None)
            rows.append(
                {
                    "group_id": group.group_id,
                    "state": group.state,
                    "calibrator": group.calibrator_name,
                    "calibration_tier": tier,
                    "rms_over_theory": image.get("rms_over_theory"),
                    "rms_mjy": image["rms_jy"] * 1e3 if "rms_jy" in image else None,
                    "calibrator_flux_ratio": image.get("calibrator_flux_ratio"),
                    "stage_seconds": timings,
                    "fits": products["image_fits"].path if "image_fits" in products else None,
                    "png": products["image_png"].path if "image_png" in products else None,
                    "reason": group.state_reason if group.state != "completed" else None,
                }
            )
    return {"groups": rows}


def render_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'group':20} {'state':12} {'calibration':16} {'rms/theory':>10} {'cal flux':>8} "
        f"{'pre':>5} {'conv':>5} {'cal':>5} {'img':>5} {'reg':>5}",
    ]
    for g in summary["groups"]:
        t = g["stage_seconds"]
        tier = (g["calibration_tier"] or "-") + (f" ({g['calibrator']})" if g["calibrator"] else "")
        lines.append(
            f"{g['group_id']:20} {g['state']:12} {tier:16} {_num(g['rms_over_theory']):>10} "
            f"{_num(g['calibrator_flux_ratio']):>8} "
            + " ".join(
                f"{t.get(s, 0):5.1f}"
                for s in ("preflight", "convert", "calibrate", "image", "register")
            )
        )
        if g["fits"]:
            lines.append(f"    FITS {g['fits']}")
            lines.append(f"    PNG  {g['png']}")
        if g["reason"]:
            lines.append(f"    reason: {g['reason']}")
    lines.append(
        f"workspace {summary['workspace']}; {len(summary['groups'])} groups in "
        f"{summary['wall_s']} s (simulation {summary['simulate_s']} s); stage times "
        "in seconds"
    )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
