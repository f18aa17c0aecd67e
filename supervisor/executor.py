"""Execute one claimed stage attempt: run the worker on its request (see
:mod:`supervisor.stage_request`), judge the outcome, and either publish its outputs and
advance the group in one transaction (with a commit manifest of the rows inside the
published directory, :mod:`supervisor.manifest`), or roll back (remove the staging area)
and apply the failure policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, delete, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from supervisor import calibration, faults, gates, manifest, metrics, registry
from supervisor.calibration import CalibrationPlan
from supervisor.casaenv import casa_environment, write_site_config
from supervisor.config import Config
from supervisor.db import Database, is_sqlite, prepared_update, update_params
from supervisor.errors import Failure
from supervisor.leases import Claim, Leases
from supervisor.models import Artifact, CalibrationSet, Group, QualityAssessment, StageAttempt
from supervisor.policy import Action, Classifier, Decision, Evidence, decide
from supervisor.postconditions import check_artifacts_by_kind
from supervisor.reconcile import artifact_size
from supervisor.runner import (
    RunOutcome,
    WorkerStarted,
    run_worker,
    worker_command,
    worker_environment,
    write_worker_identity,
)
from supervisor.stage_request import AttemptPaths, attempt_paths, build_request
from supervisor.states import (
    GroupView,
    Stage,
    StaleTransition,
    State,
    move_group,
    next_stage,
    transition,
)

log = structlog.get_logger(__name__)

# Built once (see db.prepared_update): they run for every stage.
_INSERT_ATTEMPT = insert(StageAttempt.__table__)
_INSERT_ARTIFACT = insert(Artifact.__table__)
_INSERT_ASSESSMENT = insert(QualityAssessment.__table__)
_DELETE_ARTIFACTS = delete(Artifact.__table__).where(
    Artifact.__table__.c.group_id == bindparam("group_id"),
    Artifact.__table__.c.stage == bindparam("stage"),
)
_GROUP_IDENTITY = select(*(Group.__table__.c[name] for name in manifest.GROUP_FIELDS)).where(
    Group.__table__.c.group_id == bindparam("group_id")
)
_EARLIER_ARTIFACTS = select(Artifact.__table__.c.id, Artifact.__table__.c.path).where(
    Artifact.__table__.c.group_id == bindparam("group_id"),
    Artifact.__table__.c.stage == bindparam("stage"),
    Artifact.__table__.c.kind == bindparam("kind"),
    Artifact.__table__.c.pruned_at.is_(None),
)

# Stages that write into an earlier stage's committed output, as (stage, artifact kind):
# calibrate adds MODEL_DATA and CORRECTED_DATA to the convert MS in place (copying a
# multi-GB MS per attempt is not affordable). Its commit records the MS's new size, or the
# state check would find every calibrated MS "damaged" and requeue the group from convert.
WRITES_INTO: dict[str, tuple[str, str]] = {"calibrate": ("convert", "ms")}


class StageExecutor:
    """Runs claimed attempts for one daemon (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        leases: Leases,
        *,
        classifier: Classifier | None = None,
        rng: random.Random | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.leases = leases
        self.classifier = classifier or Classifier(cfg.policy)
        self.rng = rng or random.Random()
        self.should_stop = should_stop
        self._gate_results: dict[tuple[str, int], gates.GateResult | None] = {}

    # The whole attempt -------------------------------------------------------------------
    def execute(self, claim: Claim, *, threads: int | None = None) -> str:
        """Run ``claim`` to its end; return the group's resulting state (or "lost").
        ``threads``: the worker's CPU threads (OpenMP, wsclean -j) as admission granted
        them; by default the fixed share (daemon.threads_per_worker)."""
        threads = threads or self.cfg.daemon.threads_per_worker()
        bound = log.bind(
            group_id=claim.group_id,
            stage=claim.stage,
            attempt=claim.attempt,
            correlation_id=claim.correlation_id,
        )
        stage_cfg = self.cfg.stages[claim.stage]
        plan = None
        if claim.stage == Stage.CALIBRATE:
            chosen = self._choose_calibration(claim)
            if chosen is None:
                return self._wait_for_calibration(claim, bound)
            claim, plan = chosen
        tier = stage_cfg.tiers[min(claim.tier, len(stage_cfg.tiers) - 1)]
        paths = attempt_paths(self.cfg, claim)
        # The attempt row first: another node's start-up cleanup deletes staging areas
        # that no running attempt owns, and must not catch this one in between. One
        # transaction with the request's reads: one fsync'd commit, not two.
        with self.db.core() as s:
            request = build_request(s, self.cfg, claim, tier, paths, plan, threads=threads)
            attempt_id = self._add_attempt_row(s, claim, paths)
        for stale in (paths.workdir, paths.output_dir):
            shutil.rmtree(stale, ignore_errors=True)  # a token is never reused; be safe
        paths.workdir.mkdir(parents=True)
        paths.output_dir.mkdir(parents=True)
        # Compact: the indented form takes json's pure-Python encoder (~0.3 ms a request).
        paths.request.write_text(json.dumps(request, default=str))
        site = write_site_config(paths.workdir, paths.casa_log)
        python = self.cfg.casa.python or sys.executable
        bound.info("stage.started", tier=tier.name, threads=threads, workdir=str(paths.workdir))
        outcome = run_worker(
            worker_command(python, stage_cfg.module, paths.request),
            cwd=paths.workdir,
            env=worker_environment(
                casa_environment(site),
                mark=str(paths.workdir),
                correlation_id=claim.correlation_id,
                threads=threads,
            ),
            result_path=paths.result,
            timeout_s=stage_cfg.timeout_s,
            grace_s=self.cfg.daemon.term_grace_s,
            heartbeat_s=self.cfg.daemon.heartbeat_s,
            heartbeat=lambda: self._heartbeat(claim),
            should_stop=self.should_stop,
            on_start=lambda started: self._on_worker_start(paths, started),
            stall_timeout_s=stage_cfg.stall_timeout_s,
            watch_files=(paths.casa_log,),
            memory_limit_bytes=int(stage_cfg.memory_limit_gb * 1024**3),
        )
        faults.point("after_result_written")
        if outcome.survivors:
            bound.error("stage.survivors", pids=outcome.survivors)
        try:
            return self._conclude(claim, attempt_id, paths, outcome, bound, plan)
        finally:
            shutil.rmtree(paths.output_dir, ignore_errors=True)  # rollback (no-op if published)
            _remove_if_empty(paths.output_dir.parent)
            if paths.tmpfs_area is not None:  # a worker that failed or was killed mid-write
                shutil.rmtree(paths.tmpfs_area, ignore_errors=True)

    # Pieces --------------------------------------------------------------------------
    def _choose_calibration(self, claim: Claim) -> tuple[Claim, CalibrationPlan] | None:
        """Walk the calibration chain from the claim's tier; move the group's tier to the
        first one that applies (skipped tiers are recorded in the plan). None: no tier
        applies now, the group must wait for a calibration set."""
        tiers = self.cfg.stages[claim.stage].tiers
        with self.db.transaction() as s:
            group = self._locked_group(s, claim)
            index, plan = calibration.first_applicable(s, group, self.cfg, tiers, claim.tier)
            if index is None or plan is None:
                return None
            if index != claim.tier:
                group.fallback_tier = index
        return dataclasses.replace(claim, tier=index), plan

    def _wait_for_calibration(self, claim: Claim, bound: Any) -> str:
        tiers = self.cfg.stages[claim.stage].tiers
        with self.db.transaction() as s:
            group = s.get(Group, claim.group_id)
            assert group is not None
            skipped = calibration.skipped_reasons(s, group, self.cfg, tiers, claim.tier)
        reasons = "; ".join(f"{x['tier']}: {x['reason']}" for x in skipped)
        state = self._hand_back(
            claim,
            None,
            State.WAITING_CALIBRATION,
            "no calibration tier applies yet; waiting for a calibration set"
            + (f" ({reasons})" if reasons else ""),
            fields={"fallback_tier": calibration.resume_tier(tiers)},
        )
        bound.info("stage.waiting_calibration", skipped=skipped)
        return state

    def _hand_back(
        self,
        claim: Claim,
        attempt_id: int | None,
        to: State,
        message: str,
        outcome: RunOutcome | None = None,
        fields: dict[str, Any] | None = None,
    ) -> str:
        """Give the claim back without consuming an attempt of the stage's budget (waiting
        for calibration, or stopped by shutdown): the group resumes at this stage."""
        with self.db.transaction() as s:
            try:
                group = self._locked_group(s, claim)
            except StaleTransition:
                return "lost"
            now = self.leases.now(s)
            if attempt_id is not None and outcome is not None:
                _finish_attempt_row(s, attempt_id, "abandoned", outcome, None, now, message)
            transition(
                s,
                group,
                to,
                now=now,
                actor=self.leases.actor,
                fencing_token=claim.fencing_token,
                message=message,
                set_fields={
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "attempt": max(0, claim.attempt - 1),
                    **(fields or {}),
                },
            )
        return to.value

    def _add_attempt_row(self, s: Any, claim: Claim, paths: AttemptPaths) -> int:
        result = s.execute(
            _INSERT_ATTEMPT,
            dict(
                group_id=claim.group_id,
                stage=claim.stage,
                attempt=claim.attempt,
                fallback_tier=claim.tier,
                fencing_token=claim.fencing_token,
                outcome="running",
                owner=claim.owner,
                workdir=str(paths.workdir),
                started_at=self.leases.now(s),
                correlation_id=claim.correlation_id,
            ),
        )
        return int(result.inserted_primary_key[0])

    def _on_worker_start(self, paths: AttemptPaths, started: WorkerStarted) -> None:
        """Leave the worker's identity beside its request for start-up recovery. A file,
        not a database commit: it matters only while this node is up (a reboot ends the
        worker), so it needs no fsync; the attempt row gets it when the attempt ends, and
        recovery also finds the worker's processes by the attempt's mark."""
        try:
            write_worker_identity(paths.workdir, started)
        except OSError as exc:  # the worker runs on; a restart finds it by its mark
            log.warning("attempt.pid_not_recorded", pid=started.pid, error=str(exc)[:300])
        faults.point("after_worker_start")

    def _heartbeat(self, claim: Claim) -> bool:
        try:
            return self.leases.heartbeat(claim)
        except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill a healthy worker
            log.warning("lease.heartbeat_failed", group_id=claim.group_id, error=str(exc))
            return True

    def _conclude(
        self,
        claim: Claim,
        attempt_id: int,
        paths: AttemptPaths,
        outcome: RunOutcome,
        bound: Any,
        plan: CalibrationPlan | None = None,
    ) -> str:
        if outcome.lease_lost:
            self._finish_attempt(
                attempt_id,
                "abandoned",
                outcome,
                None,
                message="lease lost while running; the worker was stopped",
            )
            bound.warning("stage.lease_lost")
            return "lost"
        if outcome.stopped:
            return self._release_for_shutdown(claim, attempt_id, outcome, bound)
        evidence = self._evidence(claim, paths, outcome)
        if evidence is None:
            try:
                return self._commit_success(claim, attempt_id, paths, outcome, bound)
            except StaleTransition:
                self._finish_attempt(
                    attempt_id, "abandoned", outcome, None, message="lost the claim before commit"
                )
                return "lost"
            except DBAPIError as exc:
                return self._commit_uncertain(claim, attempt_id, outcome, exc, bound)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The disk filled while the outputs were moved into place: nothing was
                # registered (the move was undone); retried like any ENOSPC.
                evidence = Evidence(
                    outcome="error",
                    stage=claim.stage,
                    exception_type="OSError",
                    message=f"publishing the outputs failed: {exc} (errno = 28, ENOSPC)",
                    returncode=outcome.returncode,
                )
        failure = self.classifier.classify(evidence)
        return self._apply_failure(claim, attempt_id, outcome, evidence, failure, bound, plan)

    def _commit_uncertain(
        self, claim: Claim, attempt_id: int, outcome: RunOutcome, exc: DBAPIError, bound: Any
    ) -> str:
        """The database raised while committing: it may or may not have committed (a lost
        connection after COMMIT). Read the group back instead of guessing: moved on means
        the commit held; still ours means it did not (the rename was undone) and the
        attempt is a failure like any other; unreadable means the reaper will decide."""
        bound.warning("stage.commit_uncertain", error=str(exc)[:500])
        try:
            with self.db.transaction() as s:
                group = s.get(Group, claim.group_id)
                ours = (
                    group is not None
                    and group.state == State.RUNNING
                    and group.fencing_token == claim.fencing_token
                )
                state = group.state if group is not None else "lost"
        except DBAPIError:
            bound.error("stage.commit_unknown")
            return "lost"  # the lease expires; the reaper returns it to its checkpoint
        if not ours:
            bound.info("stage.commit_confirmed", state=state)
            return state
        evidence = Evidence(
            stage=claim.stage,
            outcome="error",
            exception_type=type(exc).__name__,
            message=f"committing the stage failed: {exc}"[:1000],
            returncode=outcome.returncode,
        )
        failure = self.classifier.classify(evidence)
        return self._apply_failure(claim, attempt_id, outcome, evidence, failure, bound)

    def _evidence(self, claim: Claim, paths: AttemptPaths, outcome: RunOutcome) -> Evidence | None:
        """None when the attempt succeeded and its post-conditions hold."""
        result, rc = outcome.result, outcome.returncode
        common = {"stage": claim.stage, "stderr_tail": outcome.stderr_tail, "returncode": rc}
        if outcome.hung:
            return Evidence(
                outcome="hung",
                message=(
                    f"no CPU time and no output for "
                    f"{self.cfg.stages[claim.stage].stall_timeout_s:.0f} s; worker process "
                    "group killed"
                ),
                **common,
            )
        if outcome.timed_out:
            return Evidence(
                outcome="timeout",
                message=(
                    f"no result after {self.cfg.stages[claim.stage].timeout_s:.0f} s; worker "
                    "process group killed"
                ),
                **common,
            )
        if result is None:
            if outcome.result_problem == "no result file" and rc != 0:
                return Evidence(outcome="crash", message="worker exited without a result", **common)
            return Evidence(outcome="invalid_result", message=str(outcome.result_problem), **common)
        log_lines = tuple(str(x) for x in result.get("log_lines", []))
        if result["status"] == "failed":
            err = result["error"]
            return Evidence(
                outcome="error",
                exception_type=str(err.get("type", "")),
                message=str(err.get("message", "")),
                log_lines=log_lines,
                worker_category=err.get("category"),
                worker_code=err.get("code"),
                worker_hint=str(err.get("hint", "")),
                details={"traceback_tail": str(err.get("traceback", ""))[-1500:]},
                **common,
            )
        problems = check_artifacts(result, paths.output_dir)
        if not problems:
            problems = check_artifacts_by_kind(result, paths.output_dir)
        if problems:
            return Evidence(
                outcome="postcondition", message="; ".join(problems), log_lines=log_lines, **common
            )
        gate = gates.evaluate(claim.stage, result.get("metrics", {}), self.cfg.gates)
        self._gate_results[claim.key] = gate
        if gate is not None and gate.failed:
            return Evidence(
                outcome="gate",
                message=gate.summary(),
                log_lines=log_lines,
                worker_category=gates.on_fail_category(claim.stage, self.cfg.gates),
                worker_code=f"{claim.stage}_gate_failed",
                worker_hint="a mandatory quality gate failed; see the quality assessment",
                **common,
            )
        return None

    def _commit_success(
        self,
        claim: Claim,
        attempt_id: int,
        paths: AttemptPaths,
        outcome: RunOutcome,
        bound: Any,
    ) -> str:
        result = outcome.result or {}
        following = next_stage(Stage(claim.stage))
        fields: dict[str, Any] = {
            "lease_owner": None,
            "lease_expires_at": None,
            "attempt": 0,
            "fallback_tier": 0,
            "crash_count": 0,
        }
        tier_name = self._tier_name(claim)
        with self.db.core() as s:
            now = self.leases.now(s)
            if following is None:
                fields["completed_at"] = now
            else:
                fields["stage"] = following.value
            # The fenced move first: a claim that is no longer ours (StaleTransition) stops
            # here, before any file is moved; the rest of the transaction commits with it.
            move_group(
                s,
                GroupView(claim.group_id, State.RUNNING.value, claim.stage),
                State.COMPLETED if following is None else State.PENDING,
                now=now,
                actor=self.leases.actor,
                fencing_token=claim.fencing_token,
                set_fields=fields,
                message=f"{claim.stage} committed"
                + ("; group complete" if following is None else ""),
            )
            # The rows, then the manifest of what they record, then the rename: the rename
            # is the last step before the commit (and publishes the manifest with the files).
            s.execute(_DELETE_ARTIFACTS, {"group_id": claim.group_id, "stage": claim.stage})
            entries = manifest.artifact_entries(paths.output_dir, result.get("artifacts", []))
            rows = [
                {
                    "group_id": claim.group_id,
                    "attempt_id": attempt_id,
                    "stage": claim.stage,
                    "kind": entry["kind"],
                    "path": str(paths.final_dir / entry["path"]),
                    "bytes": entry["bytes"],
                    "created_at": now,
                }
                for entry in entries
            ]
            if rows:
                s.execute(_INSERT_ARTIFACT, rows)
            _finish_attempt_row(s, attempt_id, "succeeded", outcome, None, now)
            resized: dict[str, int] = {}
            if claim.stage in WRITES_INTO:
                resized = _record_new_sizes(s, claim.group_id, *WRITES_INTO[claim.stage])
            gate = self._record_gate(s, claim, attempt_id, now)
            cal_set = self._on_commit(s, claim, result, paths, now)
            group_row = s.execute(_GROUP_IDENTITY, {"group_id": claim.group_id}).one()
            manifest.write(
                paths.output_dir,
                manifest.build(
                    group=manifest.group_snapshot(dict(group_row._mapping)),
                    stage=claim.stage,
                    fencing_token=claim.fencing_token,
                    attempt=claim.attempt,
                    tier=claim.tier,
                    tier_name=tier_name,
                    committed_at=now,
                    next_stage=following.value if following else None,
                    result=result,
                    artifacts=entries,
                    gate=gate,
                    calibration_set=cal_set,
                    workdir=str(paths.workdir),
                    resized=resized,
                ),
            )
            published = publish(paths.output_dir, paths.final_dir)
            try:
                faults.point("between_rename_and_commit")
            except BaseException:
                published.undo()
                raise
        published.discard_previous()
        metrics.FALLBACK.labels(claim.stage, tier_name).inc()
        _observe(claim.stage, outcome)
        bound.info(
            "stage.committed",
            seconds=round(outcome.duration_s, 2),
            next_stage=following and following.value,
        )
        return State.COMPLETED.value if following is None else State.PENDING.value

    def _apply_failure(
        self,
        claim: Claim,
        attempt_id: int,
        outcome: RunOutcome,
        evidence: Evidence,
        failure: Failure,
        bound: Any,
        plan: CalibrationPlan | None = None,
    ) -> str:
        invalidated = None
        with self.db.transaction() as s:
            try:
                group = self._locked_group(s, claim)
            except StaleTransition:
                self._finish_attempt(attempt_id, "abandoned", outcome, failure)
                return "lost"
            now = self.leases.now(s)
            if (
                plan is not None
                and plan.set_id is not None
                and failure.code in calibration.DAMAGED_SET_CODES
                and calibration.invalidate_damaged_set(s, plan.set_id, failure.message)
            ):
                invalidated = s.get(CalibrationSet, plan.set_id)
                bound.error(
                    "calibration.set_invalidated", set_id=plan.set_id, reason=failure.message
                )
            crashes = group.crash_count + (1 if evidence.is_crash else 0)
            decision: Decision = decide(
                failure,
                is_crash=evidence.is_crash,
                attempt=claim.attempt,
                crash_count=crashes,
                tier=claim.tier,
                stage=self.cfg.stages[claim.stage],
                retry=self.cfg.retry,
                now=now,
                rng=self.rng,
            )
            _finish_attempt_row(s, attempt_id, "failed", outcome, decision.failure, now)
            self._record_gate(s, claim, attempt_id, now)
            fields: dict[str, Any] = {
                "lease_owner": None,
                "lease_expires_at": None,
                "crash_count": crashes,
            }
            if decision.action == Action.RETRY:
                to = State.RETRY_WAIT
                fields["next_attempt_at"] = decision.next_attempt_at
            elif decision.action == Action.NEXT_TIER:
                to = State.PENDING
                fields.update(fallback_tier=decision.tier, attempt=0)
            elif decision.action == Action.WAIT_CALIBRATION:
                to = State.WAITING_CALIBRATION
                fields.update(
                    fallback_tier=calibration.resume_tier(self.cfg.stages[claim.stage].tiers),
                    attempt=0,
                )
            elif decision.action == Action.QUARANTINE:
                to = State.QUARANTINED
            else:
                to = State.FAILED
            transition(
                s,
                group,
                to,
                now=now,
                actor=self.leases.actor,
                fencing_token=claim.fencing_token,
                failure=decision.failure,
                set_fields=fields,
                message=decision.failure.message
                + (f" [{decision.reason}]" if decision.reason else ""),
            )
        if invalidated is not None:
            manifest.record_calibration_status(
                self.cfg.path("products"),
                invalidated.group_id,
                invalidated.id,
                invalidated.status,
                invalidated.status_reason,
                now,
            )
        metrics.FAILURES.labels(claim.stage, str(failure.category), decision.failure.code).inc()
        _observe(claim.stage, outcome)
        bound.warning(
            "stage.failed",
            outcome=evidence.outcome,
            category=str(failure.category),
            code=decision.failure.code,
            action=str(decision.action),
            message=decision.failure.message,
            hint=decision.failure.hint,
        )
        return to.value

    def _tier_name(self, claim: Claim) -> str:
        tiers = self.cfg.stages[claim.stage].tiers
        return tiers[min(claim.tier, len(tiers) - 1)].name

    def _record_gate(
        self, s: Any, claim: Claim, attempt_id: int, now: datetime
    ) -> dict[str, Any] | None:
        """The gate's verdict as a QA row (and metrics); returns the row's values."""
        gate = self._gate_results.pop(claim.key, None)
        if gate is None:
            return None
        metrics.GATE_VERDICTS.labels(claim.stage, gate.verdict).inc()
        metrics.GATE_SCORE.labels(claim.stage).observe(gate.score)
        row = {"score": gate.score, "verdict": gate.verdict, "metrics": gate.as_dict()["metrics"]}
        s.execute(
            _INSERT_ASSESSMENT,
            dict(
                group_id=claim.group_id,
                attempt_id=attempt_id,
                stage=claim.stage,
                created_at=now,
                **row,
            ),
        )
        return row

    def _on_commit(
        self,
        conn: Connection,
        claim: Claim,
        result: dict[str, Any],
        paths: AttemptPaths,
        now: datetime,
    ) -> dict[str, Any] | None:
        """Stage-specific rows that must commit with the stage: products (Core) and
        calibration sets (ORM objects, in a session that joins the transaction on ``conn``).
        Returns the calibration set registered (its manifest entry), if any."""
        metrics = result.get("metrics", {})
        own_solve = metrics.get("calibration_tier") in (None, "self")
        solved = claim.stage == Stage.CALIBRATE and metrics.get("mode") == "solve" and own_solve
        if claim.stage == Stage.REGISTER:
            registry.register_products(conn, claim.group_id, now)
        if not solved:
            return None
        with Session(bind=conn) as s:  # joins the commit's transaction
            group = s.get(Group, claim.group_id)
            tables = {a["kind"]: paths.final_dir / a["path"] for a in result.get("artifacts", [])}
            cal_set = calibration.register_solution(s, group, tables, metrics, self.cfg, now)
            released = calibration.release_waiting(s, cal_set, now, self.leases.actor)
            # Flushed here, inside the caller's try: an ORM write that fails undoes the publish.
            s.flush()
            log.info(
                "calibration.registered",
                set_id=cal_set.id,
                group_id=group.group_id,
                calibrator=cal_set.calibrator,
                released=released,
            )
            return {
                "id": cal_set.id,
                "calibrator": cal_set.calibrator,
                "solved_at": cal_set.solved_at.isoformat(),
                "valid_from": cal_set.valid_from.isoformat(),
                "valid_until": cal_set.valid_until.isoformat(),
                "status": cal_set.status,
                "status_reason": cal_set.status_reason,
                "metrics": cal_set.metrics,
                "tables": [
                    {
                        "kind": t.kind,
                        "path": str(Path(t.path).relative_to(paths.final_dir)),
                        "interp": t.interp,
                    }
                    for t in cal_set.tables
                ],
            }

    def _release_for_shutdown(
        self, claim: Claim, attempt_id: int, outcome: RunOutcome, bound: Any
    ) -> str:
        state = self._hand_back(
            claim,
            attempt_id,
            State.PENDING,
            f"shutdown: {claim.stage} stopped, resumes here",
            outcome,
        )
        bound.info("stage.released_for_shutdown")
        return state

    def _finish_attempt(
        self,
        attempt_id: int,
        outcome_name: str,
        outcome: RunOutcome,
        failure: Failure | None,
        message: str | None = None,
    ) -> None:
        with self.db.transaction() as s:
            now = self.leases.now(s)
            _finish_attempt_row(s, attempt_id, outcome_name, outcome, failure, now, message)

    def _locked_group(self, s: Any, claim: Claim) -> Group:
        query = select(Group).where(Group.group_id == claim.group_id)
        if not is_sqlite(self.db.engine):
            query = query.with_for_update()
        group = s.scalars(query).one()
        if group.state != State.RUNNING or group.fencing_token != claim.fencing_token:
            raise StaleTransition(
                f"group {claim.group_id}: claim token {claim.fencing_token} no longer current"
            )
        return group


# Helpers ------------------------------------------------------------------------------


def check_artifacts(result: dict[str, Any], output_dir: Path) -> list[str]:
    """Every declared artifact must be inside ``output_dir``, exist, and not be empty."""
    problems = []
    root = output_dir.resolve()
    for art in result.get("artifacts", []):
        rel = art.get("path") if isinstance(art, dict) else None
        if not isinstance(rel, str) or not rel:
            problems.append(f"artifact without a path: {art!r}")
            continue
        path = (output_dir / rel).resolve()
        if root not in path.parents:
            problems.append(f"artifact {rel!r} lies outside the staging area")
        elif not path.exists():
            problems.append(f"declared artifact {rel} was not written")
        elif artifact_size(path) == 0:
            problems.append(f"artifact {rel} is empty")
    return problems


@dataclass
class Published:
    """A directory moved into place, with what it replaced kept until the commit holds."""

    final_dir: Path
    staged_from: Path
    previous: Path | None

    def undo(self) -> None:
        if self.final_dir.exists():
            self.final_dir.rename(self.staged_from)
        if self.previous is not None and self.previous.exists():
            self.previous.rename(self.final_dir)

    def discard_previous(self) -> None:
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)


def publish(staged: Path, final_dir: Path) -> Published:
    """Atomically put ``staged`` at ``final_dir`` (same filesystem: one rename)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = None
    if final_dir.exists():  # a requeued stage, or outputs left by a crash before commit
        previous = final_dir.with_name(f".{final_dir.name}.replaced-{staged.name}")
        shutil.rmtree(previous, ignore_errors=True)
        final_dir.rename(previous)
    try:
        staged.rename(final_dir)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: staging on another filesystem
            raise
        tmp = final_dir.with_name(f".{final_dir.name}.incoming")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(staged, tmp, symlinks=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a torn copy behind
            if previous is not None:
                previous.rename(final_dir)
            raise
        tmp.rename(final_dir)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True, exist_ok=True)  # so that undo() has somewhere to go
    return Published(final_dir, staged, previous)


def _finish_attempt_row(
    s: Any,
    attempt_id: int,
    outcome_name: str,
    outcome: RunOutcome,
    failure: Failure | None,
    now: datetime,
    message: str | None = None,
) -> None:
    """Record how an attempt ended: one UPDATE of its row."""
    values: dict[str, Any] = {
        "outcome": outcome_name,
        "finished_at": now,
        "exit_code": outcome.returncode,
        "peak_rss_bytes": outcome.peak_rss_bytes or None,
        "worker_seconds": outcome.worker_s or None,
        "worker_cpu_seconds": outcome.worker_cpu_s or None,
        "result": outcome.result,
    }
    if outcome.pid:
        values.update(pid=outcome.pid, pgid=outcome.pid, proc_start_time=outcome.create_time)
    if failure is not None:
        values.update(
            error_category=str(failure.category),
            error_code=failure.code,
            error_type=str(failure.details.get("exception_type") or "") or None,
            error_message=failure.message,
            hint=failure.hint,
        )
    if message:
        values["error_message"] = message
    stmt = prepared_update(StageAttempt.__table__, ("id",), tuple(sorted(values)))
    s.execute(stmt, update_params({"id": attempt_id}, values))


def _record_new_sizes(s: Any, group_id: str, stage: str, kind: str) -> dict[str, int]:
    """Record the current size of ``group_id``'s committed ``stage`` outputs of ``kind``
    (a later stage wrote into them; see WRITES_INTO); returns path -> bytes."""
    update = prepared_update(Artifact.__table__, ("id",), ("bytes",))
    sizes = {}
    for artifact_id, path in s.execute(
        _EARLIER_ARTIFACTS, {"group_id": group_id, "stage": stage, "kind": kind}
    ).all():
        sizes[path] = artifact_size(Path(path))
        s.execute(update, update_params({"id": artifact_id}, {"bytes": sizes[path]}))
    return sizes


def _observe(stage: str, outcome: RunOutcome) -> None:
    metrics.DURATION.labels(stage).observe(outcome.duration_s)
    if outcome.peak_rss_bytes:
        metrics.PEAK_RSS.labels(stage).observe(outcome.peak_rss_bytes)


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()
