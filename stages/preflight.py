"""Preflight: the 16 subband files open as UVH5 and agree with each other and with the band
plan, and there is room (disk, optionally tmpfs) for the products they will become."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import (
    BAND_HIGH_HZ,
    N_SUBBANDS,
    SUBBAND_WIDTH_HZ,
    free_bytes,
    ordered_subband_files,
    quiet_astropy,
    storage_failed,
)
from stages.protocol import StageFailure, run, write_json_atomic

MS_SIZE_FACTOR = 2.5  # MS with MODEL_DATA and CORRECTED_DATA ~ 2.5 x the UVH5 bytes
DISK_MARGIN = 1.2  # +20 %
TMPFS_FACTOR = 2.0  # conversion staging in tmpfs wants 2 x the input


def stage(request: dict[str, Any]) -> dict[str, Any]:
    quiet_astropy()
    from pyuvdata import UVData

    files = ordered_subband_files(request)
    headers = []
    for path in files:
        uvd = UVData()
        try:
            uvd.read(path, file_type="uvh5", read_data=False, run_check=False)
        except (OSError, ValueError, KeyError) as exc:
            if storage_failed(exc):  # the mount failed, not the file: never quarantine for it
                raise StageFailure(
                    "retryable",
                    "storage_unavailable",
                    f"{path}: the incoming storage failed while reading it: {exc}",
                    "an outage of the raw-data mount; retried with backoff",
                ) from exc
            raise StageFailure(
                "validation",
                "unreadable_subband",
                f"{path}: cannot be read as UVH5: {exc}",
                "the raw file is damaged; the group is quarantined",
            ) from exc
        headers.append((path, uvd))
    problems = _consistency_problems(headers)
    if problems:
        raise StageFailure(
            "validation",
            "inconsistent_subbands",
            "; ".join(problems[:6]),
            "subband files of one group disagree; inspect the correlator output",
        )

    screen = {os.path.basename(p)[-7:-5]: screen_subband(p) for p in files}
    kept, dropped, to_flag = _decide_subbands(files, screen, request.get("gates") or {})

    input_bytes = sum(os.path.getsize(p) for p in files)
    estimate = int(input_bytes * MS_SIZE_FACTOR)
    needed = int(estimate * DISK_MARGIN)
    products = Path(request["final_dir"]).parent.parent
    free = free_bytes(products)
    if free < needed:
        raise StageFailure(
            "retryable",
            "insufficient_disk",
            f"products filesystem has {free / 1e9:.2f} GB free, the group needs "
            f"{needed / 1e9:.2f} GB (MS estimate {estimate / 1e9:.2f} GB + 20 %)",
            "free disk space under the products directory; the group is retried",
        )
    staging = "disk"
    tmpfs = request.get("tmpfs_staging")
    tmpfs_free = None
    if tmpfs:
        tmpfs_free = free_bytes(Path(tmpfs))
        if tmpfs_free >= TMPFS_FACTOR * input_bytes:
            staging = "tmpfs"
    first = headers[0][1]
    plan = {
        "staging": staging,
        "input_bytes": input_bytes,
        "estimated_ms_bytes": estimate,
        "products_free_bytes": free,
        "tmpfs_free_bytes": tmpfs_free,
        "n_antennas": int(first.Nants_data),
        "n_times": int(first.Ntimes),
        "n_channels": int(sum(u.Nfreqs for _p, u in headers)),
        "pointing_dec_deg": float(np.degrees(first.extra_keywords["phase_center_dec"])),
        "telescope_name": first.telescope.name,
        "subbands_used": len(kept),
        "dropped_subbands": dropped,
        "nonfinite_to_flag": to_flag,
    }
    out = Path(request["output_dir"])
    write_json_atomic(out / "preflight.json", plan)
    return {"artifacts": [{"path": "preflight.json", "kind": "preflight_report"}], "metrics": plan}


SCREEN_MIN_BLOCKS = 8  # a subband of fewer row blocks than this is screened whole
SCREEN_BLOCK_SHARE = 8  # else one block in this many, evenly spread, and at least the minimum


def screen_subband(path: str, min_block_rows: int = 1024) -> dict[str, Any]:
    """Non-finite values in one UVH5 file, read with h5py in blocks of rows (bounded
    memory): every uvw row, and the visibilities and nsamples of evenly spread row blocks.
    pyuvdata would refuse the file outright (uvw) or pass NaNs into the MS (visibilities).

    The visibilities are sampled, not read whole (at full size 8 of 32 blocks: the full read
    cost ~5 s of CPU per group): the fraction only decides whether a subband is mostly
    non-finite (dropped and named) or not, and convert screens, flags and counts every
    sample as it reads the band. Blocks are whole HDF5 chunks along the rows, so a sampled
    block does not decompress rows it does not use."""
    import h5py

    with h5py.File(path, "r") as fh:
        uvw = fh["Header/uvw_array"][()]
        bad_uvw = int(np.count_nonzero(~np.isfinite(uvw).all(axis=-1)))
        vis, nsamples = fh["Data/visdata"], fh["Data/nsamples"]
        n_rows = vis.shape[0]
        chunk_rows = vis.chunks[0] if vis.chunks else min_block_rows
        block_rows = chunk_rows * max(1, -(-min_block_rows // chunk_rows))
        n_blocks = max(1, -(-n_rows // block_rows))
        n_read = max(SCREEN_MIN_BLOCKS, n_blocks // SCREEN_BLOCK_SHARE)
        picked = np.unique(np.linspace(0, n_blocks - 1, min(n_blocks, n_read)).round().astype(int))
        bad = screened = 0
        for index in picked:
            rows = slice(int(index) * block_rows, min(n_rows, (int(index) + 1) * block_rows))
            block = vis[rows]
            ok = np.isfinite(block) & np.isfinite(nsamples[rows])
            bad += int(block.size - np.count_nonzero(ok))
            screened += block.size
    return {
        "file": path,
        "nonfinite_uvw_rows": bad_uvw,
        "uvw_rows": int(uvw.shape[0]),
        "nonfinite_vis": bad,  # in the screened rows
        "nonfinite_vis_fraction": bad / screened if screened else 0.0,
        "screened_fraction": round(screened / max(1, int(np.prod(vis.shape))), 4),
    }


def _decide_subbands(
    files: list[str], screen: dict[str, dict[str, Any]], gates: dict[str, Any]
) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Which subbands go on: a subband with non-finite uvw, or mostly non-finite data, is
    dropped (named, with its defect); one with a few non-finite samples is kept and
    flagged there by convert. Too few left: the group is quarantined, naming the files."""
    drop_above = float(gates.get("subband_nonfinite_drop_fraction", 0.5))
    min_kept = int(gates.get("min_usable_subbands", 12))
    dropped: dict[str, dict[str, Any]] = {}
    to_flag: dict[str, dict[str, Any]] = {}
    for sb, found in screen.items():
        name = os.path.basename(found["file"])
        if found["nonfinite_uvw_rows"]:
            dropped[sb] = {
                **found,
                "reason": f"{name}: {found['nonfinite_uvw_rows']} of {found['uvw_rows']} "
                "uvw rows are not finite",
            }
        elif found["nonfinite_vis_fraction"] > drop_above:
            dropped[sb] = {
                **found,
                "reason": f"{name}: {found['nonfinite_vis_fraction']:.1%} of the visibilities "
                "are NaN/Inf",
            }
        elif found["nonfinite_vis"]:
            to_flag[sb] = found
    kept = [f for f in files if os.path.basename(f)[-7:-5] not in dropped]
    if len(kept) < min_kept:
        raise StageFailure(
            "validation",
            "damaged_subbands",
            f"only {len(kept)} of {len(files)} subbands usable (at least {min_kept} needed): "
            + "; ".join(d["reason"] for d in dropped.values()),
            "the raw files hold non-finite values; the group is quarantined",
        )
    return kept, dropped, to_flag


def _consistency_problems(headers: list[tuple[str, Any]]) -> list[str]:
    problems: list[str] = []
    ref_path, ref = headers[0]
    ref_times = np.unique(ref.time_array)
    ref_dec = ref.extra_keywords.get("phase_center_dec")
    if ref_dec is None:
        problems.append(f"{ref_path}: no Header/extra_keywords/phase_center_dec")
    for path, uvd in headers:
        name = os.path.basename(path)
        dec = uvd.extra_keywords.get("phase_center_dec")
        if ref_dec is not None and (dec is None or abs(float(dec) - float(ref_dec)) > 1e-6):
            problems.append(f"{name}: declination {dec} differs from {ref_dec} ({ref_path})")
        times = np.unique(uvd.time_array)
        if len(times) != len(ref_times) or np.max(np.abs(times - ref_times)) > 1e-6:
            problems.append(f"{name}: time axis differs from {os.path.basename(ref_path)}")
        if (uvd.Nbls, uvd.Npols) != (ref.Nbls, ref.Npols):
            problems.append(f"{name}: shape (Nbls {uvd.Nbls}, Npols {uvd.Npols}) differs")
    # Ascending order: sb15 ... sb00. Subband k must lie in its slot of the band plan.
    seen: set[int] = set()
    for path, uvd in headers:
        freqs = np.asarray(uvd.freq_array).ravel()
        name = os.path.basename(path)
        if not np.isfinite(freqs).all() or not freqs.size:
            problems.append(f"{name}: Header/freq_array holds non-finite frequencies")
            continue
        centre = float(freqs.mean())
        slot = int((BAND_HIGH_HZ - centre) // SUBBAND_WIDTH_HZ)
        expected = int(name[-7:-5])
        if slot != expected or not 0 <= slot < N_SUBBANDS:
            problems.append(
                f"{name}: frequencies {freqs.min() / 1e6:.2f}-"
                f"{freqs.max() / 1e6:.2f} MHz are not subband {expected:02d}"
            )
        if slot in seen:
            problems.append(f"{name}: duplicates the frequencies of another subband")
        seen.add(slot)
    return problems


if __name__ == "__main__":
    run(stage)
