"""Accuracy at full DSA-110 size (``make science``): a night of a calibrator group (3C48 in
transit) and target groups with interference and dead antennas, through the real daemon and
stages, scored against the simulator's truth. Prints figures and, last, one JSON object.
Asserts nothing (targets: README, "Science at full size").

Keys: gain_amp_err_rms (fraction) and gain_phase_err_deg_rms (bandpass x gain against the
injected conj(G B), CASA's convention, on the working antennas); calibrator_flux_err
(signed fraction, apparent flux at the image's reference frequency; 3C48 sits at the phase
centre, where the primary beam is 1); faint_flux_ratio_median / _scatter (the target
fields' sources, measured / expected apparent flux; scatter = standard deviation);
astrometry_offset_arcsec (median); rms_over_theory (median over targets);
rfi_flagged_fraction_of_injected and clean_data_lost_fraction (all groups' samples on
working antennas); dead_antennas_flagged (dead antennas flagged whole in every group).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.science import flag_accuracy, gain_errors, measure_sources  # noqa: E402
from supervisor.simulate import SimulationSpec, simulate  # noqa: E402

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--antennas", type=int, default=96)
    parser.add_argument("--channels", type=int, default=48, help="per subband")
    parser.add_argument("--groups", type=int, default=4, help="the first is the calibrator")
    parser.add_argument("--dead", default="10,57", help="dead antenna indices")
    parser.add_argument("--field-sources", type=int, default=6, help="per group")
    parser.add_argument("--workdir", default=None, help="keep the night here")
    parser.add_argument(
        "--sky",
        choices=("per_group", "persistent"),
        default="per_group",
        help="persistent: one sky for the night, sources across the whole beam",
    )
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="contimg-science-"))
    ws = work / "ws"
    incoming = ws / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    dead = tuple(int(a) for a in args.dead.split(",") if a)
    t = time.perf_counter()
    truths = simulate(
        incoming,
        SimulationSpec(
            n_groups=args.groups,
            calibrator="3C48",
            calibrator_group=0,
            n_antennas=args.antennas,
            n_channels_per_subband=args.channels,
            n_field_sources=args.field_sources,
            seed=2026,
            rfi=True,
            dead_antennas=dead,
            sky=args.sky,
            field_radius_deg=1.5 if args.sky == "persistent" else 0.25,
        ),
    )
    simulate_s = time.perf_counter() - t
    print(
        f"simulated {args.groups} groups of {args.antennas} x {args.channels} in {simulate_s:.0f} s"
    )
    # A per-group sky is not persistent: keep the calibrator's model (and the image QA's
    # reference) to the beam's core, where only its own group's sources are (as the
    # end-to-end tests do). A persistent sky is modelled across the beam.
    config = ws / "science.toml"
    core = 0.9 if args.sky == "per_group" else 0.05
    config.write_text(
        '[daemon]\nmax_parallel = 2\nlisten = ""\nidle_poll_s = 0.5\n'
        "[ingest]\npoll_interval_s = 1.0\nstability_interval_s = 0.0\n"
        '[calibration]\nsky_catalogue = "incoming/truth/sky_catalogue.csv"\n'
        f"sky_model_min_beam_gain = {core}\nsky_reference_min_beam_gain = {max(core, 0.1)}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTIMG_", "NOTIFY_"))}
    base = [SCRIPT, "--workspace", str(ws), "--config", str(config)]
    subprocess.run([*base, "db", "upgrade"], env=env, check=True, capture_output=True)
    t = time.perf_counter()
    subprocess.run(
        [*base, "run", "--until-idle"],
        env=env,
        stdout=(ws / "daemon.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    run_s = time.perf_counter() - t
    db = sqlite3.connect(ws / "state" / "contimg.sqlite3")
    states = dict(db.execute("select group_id, state from groups").fetchall())
    results = {
        (g, st): json.loads(r)["metrics"]
        for g, st, r in db.execute(
            "select group_id, stage, result from stage_attempts where outcome = 'succeeded'"
        )
    }
    db.close()
    print(f"pipeline: {run_s:.0f} s; states {states}")
    truth_dir = incoming / "truth"
    cal = truths[0].group_id
    products = ws / "products"

    out: dict[str, object] = {"groups": args.groups, "antennas": args.antennas}
    out["channels"] = args.channels * 16
    out["states"] = sorted(set(states.values()))
    calib = results.get((cal, "calibrate"), {})
    if calib.get("refant"):
        errors = gain_errors(
            products / cal / "calibrate",
            truth_dir / f"{cal}.npz",
            truths[0].antenna_names.index(calib["refant"]),
        )
        out["gain_amp_err_rms"] = round(errors["amp_err_rms_pct"] / 100.0, 5)
        out["gain_phase_err_deg_rms"] = round(errors["phase_err_rms_deg"], 3)
    image = results.get((cal, "image"), {})
    if image.get("calibrator_flux_ratio") is not None:
        out["calibrator_flux_err"] = round(image["calibrator_flux_ratio"] - 1.0, 5)
    ratios, offsets_arcsec, rms = [], [], []
    for truth in truths[1:]:
        gid = truth.group_id
        fits = products / gid / "image" / "image.fits"
        if not fits.exists():
            continue
        cell = float(results[(gid, "image")]["cell_arcsec"])
        rms_jy = float(results[(gid, "image")]["rms_jy"])
        for src in measure_sources(fits, truth_dir / f"{gid}.json"):
            # "Faint" sources, but measurable: a peak fit needs ~10 sigma.
            if src.get("fit_failed") or src["expected_jy"] < 10.0 * rms_jy:
                continue
            ratios.append(src["ratio"])
            offsets_arcsec.append(src["offset_pix"] * cell)
        rms.append(results[(gid, "image")]["rms_over_theory"])
    if ratios:
        out["faint_flux_ratio_median"] = round(statistics.median(ratios), 4)
        out["faint_flux_ratio_scatter"] = round(statistics.pstdev(ratios), 4)
        out["faint_sources_measured"] = len(ratios)
        out["astrometry_offset_arcsec"] = round(statistics.median(offsets_arcsec), 3)
        out["rms_over_theory"] = round(statistics.median(rms), 3)
    injected = flagged = clean_lost_sum = 0.0
    dead_flagged = []
    for truth in truths:
        ms = products / truth.group_id / "convert" / (truth.group_id.replace(":", "-") + ".ms")
        if not ms.exists():
            continue
        score = flag_accuracy(ms, json.loads((truth_dir / f"{truth.group_id}.json").read_text()))
        injected += score.injected_samples
        flagged += score.injected_flagged * score.injected_samples
        clean_lost_sum += score.clean_lost
        dead_flagged.append(score.dead_flagged)
        print(f"{truth.group_id}: flags {score}")
    if dead_flagged:
        out["rfi_flagged_fraction_of_injected"] = round(flagged / injected, 4) if injected else None
        out["clean_data_lost_fraction"] = round(clean_lost_sum / len(dead_flagged), 4)
        out["dead_antennas_flagged"] = min(dead_flagged)
        out["dead_antennas_injected"] = len(dead)
    out["pipeline_s"] = round(run_s, 1)
    print(
        json.dumps(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
