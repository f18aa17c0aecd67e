"""Benchmark: the convert worker's peak memory at full DSA-110 size, against the visibility
array it converts (issue 9's target: < 2 x).

Simulates one full-size group (96 antennas x 48 channels x 16 subbands x 24 integrations,
with interference and two dead antennas, so that flagging does its full work), runs the
real daemon for two attempts (preflight, convert) and reads the convert attempt's row: the
worker's peak RSS as the kernel counted it (wait4's ru_maxrss, the worker and the children
it waited for) and its wall time. Prints figures and, last, one JSON object with keys
convert_peak_rss_gb, visibility_gb, peak_over_visibilities, uvh5_gb, peak_over_input,
convert_s, read_s, flag_s, write_ms_s, ms_writer, read_by, flagger. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--antennas", type=int, default=96)
    parser.add_argument("--channels", type=int, default=48, help="per subband")
    parser.add_argument(
        "--flagger", default="auto", choices=("auto", "aoflagger", "flagdata", "none")
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTIMG_", "NOTIFY_"))}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ws = Path(tmp)
        base = [SCRIPT, "--workspace", str(ws)]
        t = time.perf_counter()
        subprocess.run(
            [
                *base,
                "simulate",
                str(ws / "incoming"),
                "--groups",
                "1",
                "--nants",
                str(args.antennas),
                "--nchan",
                str(args.channels),
                "--rfi",
                "--dead-antennas",
                "10,57",
                "--seed",
                "7",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        print(f"simulated in {time.perf_counter() - t:.0f} s", flush=True)
        params = (
            f'{{ flagger = "{args.flagger}", dead_power_ratio = 0.1, noisy_power_ratio = 4.0 }}'
        )
        config = ws / "bench.toml"
        config.write_text(
            '[daemon]\nmax_parallel = 1\nlisten = ""\n[ingest]\nstability_interval_s = 0.0\n'
            f'[stages.convert]\ntiers = [{{ name = "bench", params = {params} }}]\n'
        )
        with_config = [*base, "--config", str(config)]
        subprocess.run([*with_config, "db", "upgrade"], env=env, check=True, capture_output=True)
        subprocess.run(
            [*with_config, "run", "--until-idle", "--max-attempts", "2"],
            env=env,
            check=True,
            stdout=(ws / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        db = sqlite3.connect(ws / "state" / "contimg.sqlite3")
        row = db.execute(
            "select outcome, peak_rss_bytes, worker_seconds, result from stage_attempts "
            "where stage = 'convert' order by id desc limit 1"
        ).fetchone()
        uvh5 = sum(p.stat().st_size for p in (ws / "incoming").glob("*.hdf5"))
    if row is None or row[0] != "succeeded":
        raise SystemExit(f"the convert attempt did not succeed: {row and row[:3]}")
    outcome, peak, seconds, result = row
    metrics = json.loads(result)["metrics"]
    vis = metrics["rows"] * metrics["n_chan"] * 2 * 8  # XX, YY; complex64
    figures = {
        "benchmark": "convert_memory",
        "size": f"{args.antennas}x{args.channels}x16x24",
        "convert_peak_rss_gb": round(peak / 1e9, 3),
        "visibility_gb": round(vis / 1e9, 3),
        "peak_over_visibilities": round(peak / vis, 2),
        "uvh5_gb": round(uvh5 / 1e9, 3),
        "peak_over_input": round(peak / uvh5, 2),
        "convert_s": round(seconds, 1),
        "read_s": metrics.get("read_s"),
        "flag_s": metrics.get("flag_s"),
        "write_ms_s": metrics.get("write_ms_s"),
        "ms_writer": metrics.get("ms_writer"),
        "read_by": metrics.get("read_by"),
        "flagger": metrics.get("flagger"),
    }
    print(
        f"convert: peak {peak / 1e9:.2f} GB = {peak / vis:.2f} x the {vis / 1e9:.2f} GB "
        f"visibility array ({peak / uvh5:.2f} x the {uvh5 / 1e9:.2f} GB of UVH5), "
        f"{seconds:.0f} s",
        flush=True,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
