"""Observability of a real daemon: /metrics scraped over HTTP moves as groups complete and
fail, passes `promtool check metrics`; the alert rules pass `promtool check rules`; the
Grafana dashboard and the alert rules reference only metrics the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from supervisor.db import Database
from supervisor.models import Group
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_service import NotifySocket, start_service, stop

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "monitoring" / "prometheus" / "contimg-alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "contimg-supervisor.json"
PROMTOOL = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(),
    reason="promtool is not installed (make tools extracts it from Debian's prometheus package)",
)
# Series Prometheus itself provides, or prometheus-client's default collectors.
BUILTIN = {"up", "process_start_time_seconds"}


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exported_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _h, _t, name, kind = line.split()[:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    return set(re.findall(r"\b(contimg_[a-z0-9_]+)", expr)) | (
        set(re.findall(r"\b([a-z_]+)\b", expr)) & BUILTIN
    )


def test_metrics_move_as_groups_complete_and_fail_and_pass_promtool(
    workspace: Path, sqlite_db: Database, tmp_path: Path
) -> None:
    fails = {"tiers": [{"name": "primary", "params": {"behaviour": "raise"}}]}
    fake_pipeline_config(workspace, settings={"health": {"state_check_interval_s": 1.0}})
    config = workspace / "fake.toml"
    notify = NotifySocket(tmp_path / "n.sock")
    service = start_service(workspace, notify)
    try:
        address = service.wait_event("http.listening")["address"]
        before = samples(scrape(address))
        assert before[("contimg_groups", (("state", "completed"),))] == 0
        add_pending_group(sqlite_db, "2025-10-05T12:30:00")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sqlite_db.transaction() as s:
                if s.get(Group, "2025-10-05T12:30:00").state == "completed":
                    break
            time.sleep(0.2)
        # A failing group: the image stage raises an unclassified error.
        config.write_text(config.read_text() + _stage_override("image", fails))
        service.proc.send_signal(signal.SIGHUP)
        service.wait_event("config.reloaded")
        add_pending_group(sqlite_db, "2025-10-05T12:35:09")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sqlite_db.transaction() as s:
                if s.get(Group, "2025-10-05T12:35:09").state == "failed":
                    break
            time.sleep(0.2)
        text = scrape(address)
        after = samples(text)
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
    finally:
        stop(service)
        notify.close()
    with sqlite_db.transaction() as s:
        states = {g.group_id: g.state for g in s.scalars(select(Group))}
    assert sorted(states.values()) == ["completed", "failed"]
    assert after[("contimg_groups", (("state", "completed"),))] == 1
    assert after[("contimg_groups", (("state", "failed"),))] == 1
    assert (
        after[("contimg_stage_attempts_total", (("result", "completed"), ("stage", "register")))]
        == 1
    )
    assert after[("contimg_stage_attempts_total", (("result", "failed"), ("stage", "image")))] == 1
    assert (
        after[
            (
                "contimg_stage_failures_total",
                (("category", "fatal"), ("code", "unclassified"), ("stage", "image")),
            )
        ]
        == 1
    )
    assert after[("contimg_stage_duration_seconds_count", (("stage", "preflight"),))] == 2
    assert after[("contimg_fallback_tier_total", (("stage", "convert"), ("tier", "primary")))] == 2
    assert after[("contimg_gate_verdicts_total", (("stage", "convert"), ("verdict", "pass")))] == 2
    assert after[("contimg_worker_peak_rss_bytes_count", (("stage", "convert"),))] == 2
    assert after[("contimg_groups_completed_last_hour", ())] == 1
    assert after[("contimg_queue_scrape_ok", ())] == 1
    assert after[("contimg_disk_free_bytes", (("filesystem", "products"),))] > 0
    (tmp_path / "scrape.txt").write_text(text)
    if Path(PROMTOOL).exists():
        done = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    # Whatever the dashboard and the alerts ask for, the daemon exports.
    exported = exported_names(text) | BUILTIN
    for expr in _dashboard_exprs() + _rule_exprs():
        missing = referenced_names(expr) - exported
        assert not missing, f"{expr!r} references {missing}, not exported by the daemon"


def _stage_override(stage: str, spec: dict) -> str:
    tier = spec["tiers"][0]
    params = ", ".join(f'{k} = "{v}"' for k, v in tier["params"].items())
    return f'\n[[stages.{stage}.tiers]]\nname = "{tier["name"]}"\nparams = {{ {params} }}\n'


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_is_provisionable_json_with_the_operator_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "contimg-supervisor" and dash["panels"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for what in ("cadence", "state", "duration", "failures", "calibration", "disk"):
        assert what in titles
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_every_alert_has_a_summary_and_a_runbook_naming_a_command() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {
        "ContimgFallingBehind",
        "ContimgNoGoodCalibration",
        "ContimgGroupsFailing",
        "ContimgIntakePaused",
        "ContimgDiskLow",
        "ContimgDaemonDown",
        "ContimgRestartingOften",
        "ContimgStuckLeases",
    } <= names
    for r in rules:
        assert r["annotations"]["summary"]
        assert re.search(r"contimg-supervisor \w|journalctl|systemctl", r["annotations"]["runbook"])


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    done = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
