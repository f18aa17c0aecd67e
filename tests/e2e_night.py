"""What the real-CASA end-to-end tests share: a night's handles (database, group ids, the
simulator's truth) and re-running one stage's real worker on a committed attempt's request
with other tier parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from supervisor.config import Config
from supervisor.db import Database
from supervisor.models import Artifact, Group, StageAttempt


@dataclass
class Night:
    cfg: Config
    db: Database
    ids: list[str]
    truth_dir: Path

    def group(self, index: int) -> Group:
        with self.db.transaction() as s:
            return s.get(Group, self.ids[index])  # type: ignore[return-value]

    def truth(self, index: int) -> dict:
        return json.loads((self.truth_dir / f"{self.ids[index]}.json").read_text())

    def succeeded(self, index: int, stage: str) -> StageAttempt:
        with self.db.transaction() as s:
            return s.scalars(
                select(StageAttempt).where(
                    StageAttempt.group_id == self.ids[index],
                    StageAttempt.stage == stage,
                    StageAttempt.outcome == "succeeded",
                )
            ).one()

    def metrics(self, index: int, stage: str) -> dict:
        return self.succeeded(index, stage).result["metrics"]

    def artifact(self, index: int, kind: str) -> Path:
        with self.db.transaction() as s:
            return Path(
                s.scalars(
                    select(Artifact.path).where(
                        Artifact.group_id == self.ids[index], Artifact.kind == kind
                    )
                ).one()
            )

    def rerun_worker(
        self, index: int, stage: str, tmp: Path, params: dict, **changes: object
    ) -> dict:
        """The real ``stage`` worker on group ``index``'s committed request, with tier
        ``params`` and ``changes`` to the request, in ``tmp`` (outputs in ``tmp/out``);
        returns its result record."""
        from supervisor.casaenv import casa_environment, write_site_config
        from supervisor.runner import worker_environment

        attempt = self.succeeded(index, stage)
        request = json.loads(Path(attempt.workdir, "request.json").read_text())
        out, work = tmp / "out", tmp / "work"
        out.mkdir()
        work.mkdir()
        request.update(
            output_dir=str(out),
            result_path=str(work / "result.json"),
            casa_log=str(work / "casa.log"),
            tier={"index": 0, "name": "test", "params": params},
            **changes,
        )
        path = work / "request.json"
        path.write_text(json.dumps(request))
        site = write_site_config(work, work / "casa.log")
        subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", "--request", str(path)],
            cwd=work,
            env=worker_environment(casa_environment(site), mark=str(work), threads=2),
            timeout=900,
            check=False,
            capture_output=True,
        )
        return json.loads((work / "result.json").read_text())
