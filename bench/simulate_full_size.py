"""Benchmark: simulate one full-size DSA-110 group (96 antennas x 48 channels x 24
integrations x 16 subbands) and print wall time, peak RSS and bytes written.

Run with `make bench`. Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from supervisor.simulate import SimulationSpec, simulate


def main() -> None:
    nants = int(sys.argv[1]) if len(sys.argv) > 1 else 96
    nchan = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        (truth,) = simulate(tmp, SimulationSpec(n_antennas=nants, n_channels_per_subband=nchan))
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.hdf5"))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "benchmark": "simulate_group",
                "nants": nants,
                "nchan_per_subband": nchan,
                "ntimes": 24,
                "wall_s": round(wall, 1),
                "peak_rss_mb": round(rss_mb),
                "bytes_written": size,
                "sigma_image_mjy": truth.sigma_image_jy * 1e3,
            }
        )
    )


if __name__ == "__main__":
    main()
