"""`make bench`: the orchestration benchmark, the full-size pipeline benchmark, then the
convert worker's memory at full size; their output passes through, and the last line is one
JSON object merging their figures."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True
    )
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line
    if proc.wait() != 0:
        raise SystemExit(f"{script} exited {proc.returncode}")
    return json.loads(last)


def main() -> None:
    # ORCH_ARGS / FULL_ARGS come from the Makefile (e.g. FULL_ARGS="--groups 6").
    orch_args = shlex.split(sys.argv[1]) if len(sys.argv) > 1 else []
    full_args = shlex.split(sys.argv[2]) if len(sys.argv) > 2 else []
    figures = run("orchestration.py", orch_args)
    figures.update(run("full_size.py", full_args))
    figures.update(run("convert_memory.py", []))
    figures["benchmark"] = "bench"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
