#!/usr/bin/env python3
"""Time memsteer and csdid side by side on the same panel, in one run.

memsteer: the release binary, end to end (read the CSV, estimate with 1,000 bootstrap draws and uniform
bands, write att/path/summary/diagnostics and the figures). csdid 0.4.3: ATTgt(...).fit with the settings
memsteer mirrors (never-treated controls, varying base period, dr, 1,000 multiplier draws, uniform
band); its time is the fit alone (the CSV is loaded and reshaped before the clock starts). Each tool runs
in its own child process so that its peak resident memory (ru_maxrss from wait4) is its own. Point
estimates of the two are compared cell by cell.

Usage (normally through `cargo xtask bench-peers`):
    bench_peers.py --panel PANEL.csv --memsteer target/release/memsteer --out result.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child_csdid(panel, out_csv, biters):
    import warnings

    import numpy as np
    import pandas as pd
    from csdid.att_gt import ATTgt

    df = pd.read_csv(panel, dtype={"instance_id": str, "treatment_step": str})
    steps = np.sort(df["checkpoint_step"].unique())
    period = {int(s): i + 1 for i, s in enumerate(steps)}
    ids = {v: i for i, v in enumerate(df["instance_id"].unique())}
    tr = df["treatment_step"].fillna("never")

    def g_of(ts):
        if ts == "never" or ts == "":
            return 0
        return int(np.searchsorted(steps, int(ts), side="left")) + 1

    data = pd.DataFrame({
        "id": df["instance_id"].map(ids),
        "t": df["checkpoint_step"].map(period),
        "y": df["outcome"].astype(float),
        "g": tr.map(g_of),
    })
    np.random.seed(1)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = ATTgt(yname="y", tname="t", idname="id", gname="g", data=data, control_group="nevertreated",
                    biters=biters, cband=True, alp=0.05)
        att.fit(est_method="dr", base_period="varying", bstrap=True)
    fit = time.perf_counter() - start
    r = pd.DataFrame(att.results)
    r["cohort"] = [int(steps[int(g) - 1]) for g in r["group"]]
    r["checkpoint"] = [int(steps[int(t) - 1]) for t in r["year"]]
    r[["cohort", "checkpoint", "att", "se"]].to_csv(out_csv, index=False)
    print(json.dumps({"fit_seconds": fit}))


def measured(cmd):
    """Run cmd as a child; return (wall seconds, peak RSS in MiB, stdout)."""
    with tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file)
        out = proc.stdout.read()
        # Reap the child with wait4 to get its own resource usage.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err_file.seek(0)
            sys.stderr.write(err_file.read().decode())
            raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024.0, out.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--panel", required=True)
    ap.add_argument("--memsteer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--biters", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child-csdid", nargs=2, metavar=("PANEL", "OUT_CSV"))
    args = ap.parse_args()
    if args.child_csdid:
        child_csdid(args.child_csdid[0], args.child_csdid[1], args.biters)
        return

    with tempfile.TemporaryDirectory() as tmp:
        ms_out = os.path.join(tmp, "memsteer")
        ms_wall, ms_rss, _ = measured([args.memsteer, "--threads", str(args.threads), "profile", "--panel", args.panel,
                                       "--out", ms_out, "--bootstrap", str(args.biters), "--quiet"])
        cs_csv = os.path.join(tmp, "csdid.csv")
        cs_wall, cs_rss, cs_stdout = measured([sys.executable, __file__, "--panel", args.panel, "--memsteer",
                                               args.memsteer, "--out", args.out, "--biters", str(args.biters),
                                               "--child-csdid", args.panel, cs_csv])
        fit = json.loads(cs_stdout.strip().splitlines()[-1])["fit_seconds"]

        import pandas as pd
        ours = pd.read_csv(os.path.join(ms_out, "att.csv"))
        theirs = pd.read_csv(cs_csv)
        merged = ours.merge(theirs, on=["cohort", "checkpoint"])
        max_diff = float((merged["estimate"] - merged["att"]).abs().max())
        se_ratio = (merged["std_error"] / merged["se"]).describe()

    result = {
        "panel": args.panel,
        "threads": args.threads,
        "bootstrap_draws": args.biters,
        "memsteer_end_to_end_seconds": ms_wall,
        "memsteer_peak_rss_mib": ms_rss,
        "csdid_fit_seconds": fit,
        "csdid_process_seconds": cs_wall,
        "csdid_peak_rss_mib": cs_rss,
        "speedup_vs_csdid_fit": fit / ms_wall,
        "memory_ratio": cs_rss / ms_rss,
        "cells_compared": int(len(merged)),
        "max_abs_estimate_difference": max_diff,
        "bootstrap_se_ratio_median": float(se_ratio["50%"]),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"panel {os.path.basename(args.panel)}: memsteer {ms_wall:.2f} s end to end, {ms_rss:.0f} MiB peak; "
          f"csdid fit {fit:.1f} s, {cs_rss:.0f} MiB peak")
    print(f"  speed-up {fit / ms_wall:.0f}x, memory {cs_rss / ms_rss:.0f}x less; "
          f"{len(merged)} cells, max |Δ estimate| = {max_diff:.2e}, median bootstrap se ratio {se_ratio['50%']:.3f}")


if __name__ == "__main__":
    main()
