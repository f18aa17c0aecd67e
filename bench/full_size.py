"""Benchmark: a backlog of groups through the real daemon and the real CASA/WSClean stages,
at full DSA-110 size by default (96 antennas x 48 channels x 16 subbands x 24 integrations),
the first group a calibrator transit (3C48). Prints figures and, last, one JSON object.
Asserts nothing.

- seconds_per_group: wall time from the daemon's start to the last group's end, over the
  groups (sustained under a backlog: the daemon pipelines stages across groups);
- realtime_factor: 309 s (the cadence) / seconds_per_group;
- cpu_busy_fraction: 1 - idle share of all CPUs over the run (psutil, sampled each second);
- per stage: mean wall seconds, the largest worker peak RSS, and the cores its worker kept
  busy (CPU seconds / wall seconds of the worker) (stage_attempts);
- image: imager, field (deg), image size, smearing at the edge, calibrator flux ratio,
  rms / theory of each group;
- with ``--latency``: one calibrator group alone (a group arriving every 309 s finds the
  node idle), wall seconds from the daemon's start to the group's end, with threads granted
  per attempt (the default) and with one thread per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.simulate import SimulationSpec, simulate  # noqa: E402

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
CADENCE_S = 309.0
STAGES = ("preflight", "convert", "calibrate", "image", "register")


class CpuSampler(threading.Thread):
    """Busy fraction of all CPUs between start() and stop()."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.samples: list[float] = []

    def run(self) -> None:
        psutil.cpu_percent(interval=None)
        while not self.halt.wait(1.0):
            self.samples.append(psutil.cpu_percent(interval=None) / 100.0)

    def stop(self) -> float:
        self.halt.set()
        self.join()
        return statistics.fmean(self.samples) if self.samples else 0.0


def run_backlog(
    work: Path,
    n_groups: int,
    n_antennas: int,
    n_channels: int,
    max_parallel: int,
    *,
    worker_threads: int = 0,
    name: str = "",
) -> dict:
    """Simulate ``n_groups`` (the first a 3C48 transit), run them with ``run --until-idle``
    and read the figures from the state database. ``worker_threads``: 0 grants threads per
    attempt (the default configuration), N fixes them."""
    ws = work / (name or f"ws-{n_antennas}x{n_channels}")
    incoming = ws / "incoming"
    incoming.mkdir(parents=True)
    t = time.perf_counter()
    simulate(
        incoming,
        SimulationSpec(
            n_groups=n_groups,
            calibrator="3C48",
            calibrator_group=0,
            n_antennas=n_antennas,
            n_channels_per_subband=n_channels,
            seed=2026,
        ),
    )
    simulate_s = time.perf_counter() - t
    config = ws / "bench.toml"
    config.write_text(
        f'[daemon]\nmax_parallel = {max_parallel}\nlisten = ""\nidle_poll_s = 0.5\n'
        f"worker_threads = {worker_threads}\n"
        "[ingest]\npoll_interval_s = 1.0\nstability_interval_s = 0.0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTIMG_", "NOTIFY_"))}
    base = [SCRIPT, "--workspace", str(ws), "--config", str(config)]
    subprocess.run([*base, "db", "upgrade"], env=env, check=True, capture_output=True)
    sampler = CpuSampler()
    sampler.start()
    t = time.perf_counter()
    done = subprocess.run(
        [*base, "run", "--until-idle"],
        env=env,
        stdout=(ws / "daemon.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    wall = time.perf_counter() - t
    busy = sampler.stop()
    db = sqlite3.connect(ws / "state" / "contimg.sqlite3")
    states = dict(db.execute("select state, count(*) from groups group by state").fetchall())
    rows = db.execute(
        "select stage, outcome, (julianday(finished_at) - julianday(started_at)) * 86400, "
        "peak_rss_bytes, result, worker_seconds, worker_cpu_seconds, group_id, started_at, "
        "finished_at from stage_attempts order by started_at"
    ).fetchall()
    db.close()
    per_stage: dict[str, dict] = {}
    images = []
    timeline = []
    for stage, outcome, seconds, rss, result, worker_s, cpu_s, group_id, start, end in rows:
        timeline.append(f"{start[11:19]}-{end[11:19]} {group_id[11:]} {stage:<9} {outcome}")
        if outcome != "succeeded":
            continue
        entry = per_stage.setdefault(stage, {"seconds": [], "peak_rss_mb": 0.0, "cores": []})
        entry["seconds"].append(seconds)
        if worker_s and cpu_s is not None:
            entry["cores"].append(cpu_s / worker_s)
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], (rss or 0) / 1024**2)
        if stage == "image":
            m = json.loads(result)["metrics"]
            images.append(
                {
                    k: m.get(k)
                    for k in (
                        "imager",
                        "field_deg",
                        "imsize",
                        "cell_arcsec",
                        "chan_avg",
                        "smearing_loss_at_edge",
                        "imager_s",
                        "channel_average_s",
                        "rms_over_theory",
                        "calibrator_flux_ratio",
                        "beam_major_arcsec",
                        "beam_minor_arcsec",
                    )
                }
            )
    return {
        "groups": n_groups,
        "antennas": n_antennas,
        "channels_per_subband": n_channels,
        "max_parallel": max_parallel,
        "daemon_exit": done.returncode,
        "states": states,
        "simulate_s": round(simulate_s, 1),
        "wall_s": round(wall, 1),
        "seconds_per_group": round(wall / n_groups, 1),
        "realtime_factor": round(CADENCE_S / (wall / n_groups), 3),
        "cpu_busy_fraction": round(busy, 3),
        "stages": {
            s: {
                "mean_s": round(statistics.fmean(v["seconds"]), 1),
                "max_s": round(max(v["seconds"]), 1),
                "peak_rss_mb": round(v["peak_rss_mb"]),
                # CPU seconds per wall second of the worker: the cores it kept busy
                "cores": round(statistics.fmean(v["cores"]), 2) if v["cores"] else None,
            }
            for s, v in sorted(per_stage.items(), key=lambda kv: STAGES.index(kv[0]))
        },
        "images": images,
        "timeline": timeline,
        "workspace": str(ws),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--antennas", type=int, default=96)
    parser.add_argument("--channels", type=int, default=48)
    parser.add_argument("--small-groups", type=int, default=4, help="groups at 32 x 16; 0: none")
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    parser.add_argument(
        "--latency",
        action="store_true",
        help="also one calibrator group alone (the real-time case), with threads granted and"
        " with one thread per worker",
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(dir=args.workdir, prefix="contimg-bench-")
    work = Path(tmp)
    small = None
    if args.small_groups > 0:
        small = run_backlog(work, args.small_groups, 32, 16, args.max_parallel)
        small.pop("timeline")
        print(f"32 x 16: {json.dumps(small)}", flush=True)
    full = None
    if args.groups > 0:
        full = run_backlog(work, args.groups, args.antennas, args.channels, args.max_parallel)
        for line in full.pop("timeline"):
            print(f"  {line}")
        print(f"{args.antennas} x {args.channels}: {json.dumps(full)}", flush=True)
    alone: dict[str, dict] = {}
    if args.latency:
        for label, threads in (("granted", 0), ("one_thread", 1)):
            one = run_backlog(
                work,
                1,
                args.antennas,
                args.channels,
                args.max_parallel,
                worker_threads=threads,
                name=f"alone-{label}",
            )
            one.pop("timeline")
            alone[label] = one
            print(f"one group alone, threads {label}: {json.dumps(one)}", flush=True)
    if not args.keep:
        subprocess.run(["rm", "-rf", tmp], check=False)
    figures: dict = {"benchmark": "full_size"}
    if full is not None:
        figures |= backlog_figures(full, small, args)
    for label, one in alone.items():
        figures[f"seconds_one_group_{label}"] = one["wall_s"]
        figures[f"stage_seconds_one_group_{label}"] = {
            s: v["mean_s"] for s, v in one["stages"].items()
        }
    print(json.dumps(figures))


def backlog_figures(full: dict, small: dict | None, args: argparse.Namespace) -> dict:
    """The backlog's figures for the last JSON line."""
    return {
        "seconds_per_group_full": full["seconds_per_group"],
        "realtime_factor": full["realtime_factor"],
        "cpu_busy_fraction": full["cpu_busy_fraction"],
        "stage_seconds": {s: v["mean_s"] for s, v in full["stages"].items()},
        "stage_peak_rss_mb": {s: v["peak_rss_mb"] for s, v in full["stages"].items()},
        "stage_cores": {s: v["cores"] for s, v in full["stages"].items()},
        "image_field_deg": full["images"][0]["field_deg"] if full["images"] else None,
        "imager": full["images"][0]["imager"] if full["images"] else None,
        "seconds_per_group_32x16": small["seconds_per_group"] if small else None,
        "groups_full": full["groups"],
        "states_full": full["states"],
        "size": f"{args.antennas}x{args.channels}x16x24",
    }


if __name__ == "__main__":
    main()
