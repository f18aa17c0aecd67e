"""A test-only stage worker whose behaviour the request chooses (``params.behaviour``).

succeed | raise | classified | hang | ignore_sigterm | grandchild | signal | garbage |
no_result | slow_success | bad_artifact | result_then_segv | spin | allocate; ``sequence``
picks one per attempt.
``use_tmpfs`` writes into the attempt's tmpfs area first, as convert does.
A calibrate request's plan is echoed in the metrics; ``solve_gate = "fail"`` makes a solve
report metrics that fail the calibrate gate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stages.protocol import StageFailure, run

# What the real stages report and the mandatory gates need (a pass for each gated stage).
GATE_METRICS = {
    "flagged_fraction": 0.0,
    "mode": "apply",
    "flagged_fraction_after_apply": 0.0,
    "rms_over_theory": 1.0,
}


# A solve that passes the calibrate gate, and one that fails it (bandpass mostly flagged).
SOLVE_METRICS = {
    "solution_flag_fraction": {"B": 0.0},
    "bandpass_snr_median": 50.0,
    "good_antenna_fraction": 1.0,
    "gain_amp_min": 0.9,
    "gain_amp_max": 1.1,
}
FAILING_SOLVE_METRICS = {**SOLVE_METRICS, "solution_flag_fraction": {"B": 0.56}}


def _metrics(request: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The gate metrics, echoing the calibration plan the supervisor chose (if any)."""
    plan = request.get("calibration_plan")
    if not plan:
        return GATE_METRICS
    metrics = {
        **GATE_METRICS,
        "mode": plan["mode"],
        "calibration_tier": plan["tier"],
        "calibration_set_id": plan["set_id"],
        "calibrator": plan["calibrator"],
    }
    if plan["mode"] == "solve":
        failing = params.get("solve_gate") == "fail"
        metrics.update(FAILING_SOLVE_METRICS if failing else SOLVE_METRICS)
    return metrics


def stage(request: dict[str, Any]) -> dict[str, Any]:
    params = request["tier"]["params"]
    behaviour = params.get("behaviour", "succeed")
    sequence = params.get("sequence")  # e.g. "no_result,succeed": by attempt number
    if sequence:
        steps = str(sequence).split(",")
        behaviour = steps[min(request["attempt"], len(steps)) - 1]
    out = Path(request["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if params.get("use_tmpfs") and request.get("tmpfs_area"):  # as convert stages its MS
        area = Path(request["tmpfs_area"])
        area.mkdir(parents=True, exist_ok=True)
        (area / "table.f0").write_bytes(b"\0" * 65536)
    marker = out / f"{request['stage']}.out"
    if behaviour in ("partial", "raise", "hang", "ignore_sigterm", "grandchild", "signal"):
        marker.write_text("partial output that must be rolled back")
    if behaviour == "succeed" or behaviour == "slow_success":
        if behaviour == "slow_success":
            time.sleep(float(params.get("seconds", 1.0)))
        plan = request.get("calibration_plan") or {}
        if plan.get("mode") == "solve":
            time.sleep(float(params.get("solve_seconds", 0.0)))
        marker.write_text(f"{request['group_id']} {request['stage']} attempt {request['attempt']}")
        if params.get("output_mb"):  # a bulky product (a disk can fill while it is written)
            with (out / "bulk.bin").open("wb") as fh:
                for _ in range(int(params["output_mb"])):
                    fh.write(b"\0" * 1024**2)
                fh.flush()
                os.fsync(fh.fileno())
        # The threads it was granted, as the request and the environment say them.
        threads = {"threads": request.get("threads"), "omp": os.environ.get("OMP_NUM_THREADS")}
        return {
            "artifacts": [{"path": marker.name, "kind": f"{request['stage']}_output"}],
            "metrics": {**_metrics(request, params), **threads},
        }
    if behaviour == "spin":  # busy (CPU) without output, then success: not hung
        end = time.monotonic() + float(params.get("seconds", 2.0))
        while time.monotonic() < end:
            sum(range(10_000))
        marker.write_text("spun")
        return {"artifacts": [{"path": marker.name, "kind": "x"}], "metrics": GATE_METRICS}
    if behaviour == "allocate":  # a runaway allocation (MemoryError under RLIMIT_AS)
        blocks = [bytearray(256 * 1024**2) for _ in range(int(float(params.get("gb", 4)) * 4))]
        return {"artifacts": [], "metrics": {"allocated": len(blocks)}}
    if behaviour == "bad_artifact":
        return {"artifacts": [{"path": "never-written.ms", "kind": "ms"}]}
    if behaviour == "raise":
        raise RuntimeError(params.get("message", "something unexpected"))
    if behaviour == "classified":
        raise StageFailure(
            params.get("category", "validation"),
            params.get("code", "bad_data"),
            params.get("message", "the data are bad"),
            "hint from the worker",
        )
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    if behaviour == "grandchild":
        # A grandchild in its own session: escapes the worker's process group.
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)"],
            start_new_session=bool(params.get("new_session", True)),
        )
        (out / "grandchild.pid").write_text(str(child.pid))
        if params.get("then") == "exit":
            return {"artifacts": [], "metrics": {}}
        time.sleep(3600)
    if behaviour == "signal":
        os.kill(os.getpid(), int(params.get("signum", signal.SIGSEGV)))
    if behaviour == "result_then_segv":
        # What CASA does: the work succeeded, the result is written, then teardown crashes.
        marker.write_text("complete output")
        Path(request["result_path"]).write_text(
            json.dumps(
                {
                    "status": "succeeded",
                    "metrics": GATE_METRICS,
                    "artifacts": [{"path": marker.name, "kind": "x"}],
                }
            )
        )
        os.kill(os.getpid(), signal.SIGSEGV)
    if behaviour == "garbage":
        Path(request["result_path"]).write_text("{not json")
        os._exit(0)
    if behaviour == "no_result":
        os._exit(int(params.get("exit_code", 0)))
    raise ValueError(f"unknown behaviour {behaviour!r}")


if __name__ == "__main__":
    run(stage)
