"""Register: check that every product the group will be registered with is in place, and write
the manifest (paths, sizes, QA) that the supervisor commits together with ``completed``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common import dir_bytes
from stages.protocol import StageFailure, run, write_json_atomic

REQUIRED_KINDS = ("ms", "image_fits", "image_pbcor_fits", "image_png")


def stage(request: dict[str, Any]) -> dict[str, Any]:
    artifacts = request["artifacts"]
    missing = [k for k in REQUIRED_KINDS if k not in artifacts]
    gone = [
        artifacts[k] for k in REQUIRED_KINDS if k in artifacts and not Path(artifacts[k]).exists()
    ]
    if missing or gone:
        raise StageFailure(
            "fatal",
            "products_missing",
            f"cannot register: artifacts {missing} never committed, files {gone} gone",
            "run `check-state`; then `requeue GROUP --from-stage` the stage that made them",
        )
    manifest = {
        "group_id": request["group_id"],
        "products": {
            kind: {"path": path, "bytes": dir_bytes(Path(path))}
            for kind, path in sorted(artifacts.items())
        },
        "qa": request.get("upstream_metrics", {}),
    }
    out = Path(request["output_dir"]) / "manifest.json"
    write_json_atomic(out, manifest)
    return {
        "artifacts": [{"path": "manifest.json", "kind": "manifest"}],
        "metrics": {
            "n_products": len(manifest["products"]),
            "total_bytes": sum(p["bytes"] for p in manifest["products"].values()),
        },
    }


if __name__ == "__main__":
    run(stage)
