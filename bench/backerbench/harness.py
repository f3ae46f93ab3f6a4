"""bench/run's procedure: peers, datasets, rounds of every tool, the best of
the rounds, then RESULTS.md, the charts and results.json."""

import datetime
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

from . import timing
from .chart import draw_chart
from .common import BENCH, CACHE, LOGS, MiB, WORK, log
from .datasets import LargeDataset, TreeDataset, empty_trash, wait_for_freed_inodes
from .floors import measure_floors, measure_zstd_levels
from .report import LARGE_COLS, TREE_COLS, VARIANTS, machine_line, report
from .timing import BgBuild, Step
from .tools import (Backer, BackerS3, BackerS3Slow, BackerServer, BackerServerS3, Borg, Kopia,
                    Restic, ResticS3Slow, Rustic)


DATASETS = ("tree", "large")


def best_step(steps):
    ok = [s for s in steps if s.ok]
    return min(ok, key=lambda s: s.wall_s) if ok else steps[0]


def merge_rounds(rounds, names):
    """Best of the rounds per step (lowest wall time among successful runs; its
    CPU and RSS come with it). A failure in any round is kept as a note."""
    results = []
    for name in names:
        runs = [r for rnd in rounds for r in rnd["results"] if r["tool"] == name]
        if not runs:
            continue
        merged = {"tool": name, "version": runs[0]["version"], "steps": {}}
        for key in dict.fromkeys(k for r in runs for k in r["steps"]):  # ordered union
            merged["steps"][key] = best_step([r["steps"][key] for r in runs if key in r["steps"]])
        for key in ("repo_bytes", "repo_bytes_changed"):
            sizes = [r[key] for r in runs if key in r]
            if sizes:
                merged[key] = max(sizes)
        na = {k: why for r in runs for k, why in r.get("na", {}).items()}
        if na:
            merged["na"] = na
        for key in ("restore_check", "restore_one_check"):
            checks = [r[key] for r in runs if key in r]
            if checks:
                bad = [c for c in checks if not c.startswith("ok")]
                merged[key] = bad[0] if bad else checks[0]
        results.append(merged)
    floors, zlevels = [], []
    if rounds and rounds[0]["floors"]:
        for i, f in enumerate(rounds[0]["floors"]):
            runs = [rnd["floors"][i] for rnd in rounds]
            st = best_step([Step(**r["step"]) for r in runs])
            floors.append({**f, "step": asdict(st)})
        for i, z in enumerate(rounds[0]["zstd_levels"]):
            runs = [rnd["zstd_levels"][i] for rnd in rounds if "out_bytes" in rnd["zstd_levels"][i]]
            if not runs:
                zlevels.append(z)
                continue
            zlevels.append({**runs[0], "comp_mb_s": max(r["comp_mb_s"] for r in runs),
                            "decomp_mb_s": max(r["decomp_mb_s"] for r in runs)})
    return results, floors, zlevels


def raw_rounds(rounds):
    return [{**rnd, "results": [
        {**r, "steps": {k: asdict(v) for k, v in r["steps"].items()}}
        for r in rnd["results"]]} for rnd in rounds]


def run(args, datasets):
    """One bench/run: args is its parsed command line (args.out set), datasets
    the keys of the datasets to measure (of DATASETS). Returns the exit
    status: 1 if Backer is missing or any step failed."""
    large_size = (args.large_size or (64 if args.small else 4096)) * MiB
    timing.WAIT_IDLE = args.wait_idle if args.wait_idle is not None else (0 if args.small else 600)
    started = datetime.datetime.now()

    # Niced: the machine is shared (2 cores, someone compiling). Inherited by
    # every tool we start. BENCH_NICE=0 for a dedicated machine.
    want = int(os.environ.get("BENCH_NICE", "19"))
    if want > os.nice(0):
        os.nice(want - os.nice(0))

    WORK.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    empty_trash()  # a run that was stopped leaves its own

    # Peers first: apt is quick; the kopia and rustic builds are slow, so in full
    # mode they are started in the background now and waited for only when the
    # tool list gets to them. --small (CI) does not start them: they would take
    # far longer than the run.
    installer = [str(BENCH / "install-peers"), "--apt-only" if args.small else "--bg"]
    if subprocess.run(installer).returncode != 0:
        log("install-peers failed; measuring what is there")
    timing.BG = BgBuild()

    # The datasets first (the large file is generated once and cached), so no
    # tool waits on them.
    sets = []
    if "tree" in datasets:
        tree = TreeDataset(args.small)
        log(f"dataset {tree.path}: {tree.info['files']} files, "
            f"{tree.info['bytes'] / MiB:.0f} MiB; one-file restore: {tree.one}")
        sets.append(tree)
    if "large" in datasets:
        sets.append(LargeDataset(args.small, large_size))

    wanted = [t.strip().lower() for t in args.tools.split(",") if t.strip()]
    tools, skipped, failed = [], [], False
    for tool in (Backer(), BackerServer(), BackerS3(), BackerS3Slow(), BackerServerS3(),
                 Restic(), ResticS3Slow(), Borg(), Rustic(), Kopia()):
        if tool.name.lower() not in wanted:
            continue
        if tool.bg_build and tool.missing() and timing.BG.running():
            if args.no_wait_rustic or args.small:
                log(f"{tool.bg_build} is still building; skipping it (--small / --no-wait-builds)")
            else:
                # Every round must measure the same tools, so wait here. The
                # build runs at nice 19 with one job: expect tens of minutes.
                # (Each dataset's page cache is warmed right before its runs.)
                log(f"waiting for the {tool.bg_build} build "
                    f"(log: {CACHE / (tool.bg_build + '-install.log')})")
                subprocess.run([str(BENCH / "install-peers"), "--wait", tool.bg_build])
        why = tool.missing()
        if why:
            log(why)
            skipped.append((tool.name, why))
            if tool.name == "Backer":
                failed = True     # the point of the run; still measure the peers
            continue
        tools.append(tool)

    # Per dataset, rounds: everything is measured --repeat times and the best
    # (lowest wall time) of each step is reported: on a shared machine noise
    # only ever adds time. The tool order rotates each round so no tool always
    # goes first. The Backer variants (server, S3) run on the tree only.
    merged, rounds_by = {}, {}
    floors, zlevels, tar_bytes = [], [], None
    for ds in sets:
        ds_tools = tools if ds.key == "tree" else [t for t in tools if t.name not in VARIANTS]
        ds.warm()
        if ds.key == "tree":
            # (The large dataset restores one file: one inode.)
            wait_for_freed_inodes()
        rounds = []
        try:
            for i in range(args.repeat):
                log(f"=== {ds.key}: round {i + 1} of {args.repeat}")
                rnd = {"floors": [], "tar_bytes": None, "zstd_levels": [], "results": []}
                if ds.key == "tree" and not args.no_floors:
                    rnd["floors"], rnd["tar_bytes"] = measure_floors(ds.path)
                    rnd["zstd_levels"] = measure_zstd_levels(ds.path, args.small)
                n = len(ds_tools)
                for tool in ds_tools[i % n:] + ds_tools[:i % n] if ds_tools else []:
                    log(f"--- {ds.key}: {tool.name} ({tool.version()})")
                    short = ds.short_of_disk() if ds.key == "large" else None
                    if short:
                        # A full disk would fail this run and whatever else
                        # runs on the machine.
                        log(f"{tool.name}: {short}")
                        r = {"tool": tool.name, "version": tool.version(),
                             "steps": {"init": Step(note=short)}}
                    else:
                        r = tool.run(ds)
                    rnd["results"].append(r)
                    failed |= not all(st.ok for st in r["steps"].values())
                rounds.append(rnd)
        finally:
            ds.done()
            empty_trash()
        rounds_by[ds.key] = rounds
        merged[ds.key], fl, zl = merge_rounds(rounds, [t.name for t in ds_tools])
        if ds.key == "tree":
            floors, zlevels = fl, zl
            tar_bytes = rounds[-1]["tar_bytes"] if rounds else None

    by_key = {ds.key: ds for ds in sets}
    tree = (by_key["tree"], merged["tree"]) if "tree" in by_key else None
    large = (by_key["large"], merged["large"]) if "large" in by_key else None
    charts = {}
    if tree:
        i = tree[0].info
        charts["tree"] = draw_chart(
            "tree", f"System tree ({i['bytes'] / MiB:.0f} MiB, {i['files']} files): "
            "restic's figure / each tool's", TREE_COLS, tree[1], args.out, args.small)
    if large:
        charts["large"] = draw_chart(
            "large", f"One {large[0].info['v1']['bytes'] / MiB:.0f} MiB file, then 1 % changed: "
            "restic's figure / each tool's", LARGE_COLS, large[1], args.out, args.small)
    md = report(args, started, tree, large, floors, tar_bytes, zlevels, skipped, tools, charts)
    Path(args.out).write_text(md)
    raw = {"started": started.isoformat(timespec="seconds"), "small": args.small,
           "machine": machine_line(), "skipped": skipped,
           # The system tree's, where they always were.
           "dataset": tree[0].info if tree else None,
           "one_file": tree[0].one if tree else None,
           "rounds": raw_rounds(rounds_by.get("tree", [])),
           "large": {"dataset": large[0].info,
                     "rounds": raw_rounds(rounds_by["large"])} if large else None,
           "charts": charts}
    (WORK / ("results-small.json" if args.small else "results.json")).write_text(
        json.dumps(raw, indent=1))
    print(md)
    if skipped and any(n == "Backer" for n, _ in skipped):
        log("Backer is missing: peers were measured, exiting non-zero")
    return 1 if failed else 0
