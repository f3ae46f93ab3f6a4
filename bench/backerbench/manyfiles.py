"""bench/many-files' procedure: every tool's first backup and unchanged
re-run of a tree of many small files, beside the floor of a bare stat walk
of the same tree, in the same run."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import WORK
from .datasets import build_many_files
from .timing import timed, timed_or_exit
from .tools import Backer, Borg, Kopia, Restic, Rustic

TOOLS = {"backer": Backer, "restic": Restic, "kopia": Kopia, "borg": Borg, "rustic": Rustic}


def run(a):
    """a: bench/many-files' parsed command line (files, tools, limit_mib, out)."""
    data = WORK / "many-small"
    build_many_files(data, a.files)
    names = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        sys.exit(f"many-files: unknown tools {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    # The floor: what any backup must do to see that nothing changed, one
    # stat per entry (find's own, warm: run once untimed first).
    walk = ["sh", "-c", f"find '{data}' -printf '%s %T@ %i\\n' >/dev/null"]
    subprocess.run(walk, check=True)
    # Every file's content read once, untimed: else the first tool timed
    # reads from the disk what the others find in the page cache.
    subprocess.run(["sh", "-c", f"find '{data}' -type f -print0 | xargs -0 cat >/dev/null"], check=True)
    floor, _ = timed_or_exit("many-files", "many-files-stat-walk", walk)
    print(f"stat walk (find -printf '%s %T@ %i'): {floor:.2f} s")
    rows = []
    backer_peak = None
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        for name in names:
            tool = TOOLS[name]()
            why = tool.missing()
            if why:
                print(f"{tool.name}: skipped ({why})")
                continue
            tool.base = Path(tmp) / name
            tool.base.mkdir()
            repo = tool.base / "repo"
            env = {**os.environ, **tool.env()}
            subprocess.run(tool.init(repo), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first = timed(f"many-files-{name}-backup", tool.backup(repo, data), tool.env(),
                          settle=False, quiet=True)
            rerun = timed(f"many-files-{name}-rerun", tool.backup(repo, data), tool.env(),
                          settle=False, quiet=True)
            if not (first.ok and rerun.ok):
                print(f"{tool.name}: failed ({first.note or rerun.note}; logs in bench/work/logs)")
                continue
            print(f"{tool.name}: first backup {first.wall_s:.1f} s ({first.rss_mb:.0f} MiB), "
                  f"re-run {rerun.wall_s:.2f} s ({rerun.rss_mb:.0f} MiB)")
            rows.append((tool.name, tool.version(), first, rerun))
            if name == "backer":
                backer_peak = max(first.rss_mb, rerun.rss_mb)
            # A million files' repository and cache: gone before the next tool.
            shutil.rmtree(tool.base, ignore_errors=True)
    table = markdown(a.files, floor, rows)
    print()
    print(table)
    if a.out:
        Path(a.out).write_text(table)
    if backer_peak is not None:
        if backer_peak > a.limit_mib:
            sys.exit(f"many-files: Backer's peak RSS {backer_peak:.0f} MiB is above the "
                     f"{a.limit_mib:.0f} MiB limit")
        print(f"many-files: Backer's peak RSS {backer_peak:.0f} MiB, within {a.limit_mib:.0f} MiB")


def markdown(files, floor, rows):
    lines = [f"{files:,} files of 0-4 KiB (bench/many-files); stat walk "
             f"(`find DIR -printf '%s %T@ %i\\n'`, warm) {floor:.2f} s, same run.",
             "",
             "| tool | first backup s | re-run s | re-run / stat walk | first backup RSS MiB "
             "| re-run RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, version, first, rerun in rows:
        label = f"{name} ({version})" if version else name
        # GNU time counts hundredths: a small tree's walk may round to 0.
        ratio = f"{rerun.wall_s / floor:.2f}x" if floor > 0 else "—"
        lines.append(f"| {label} | {first.wall_s:.1f} | {rerun.wall_s:.2f} | "
                     f"{ratio} | {first.rss_mb:.0f} | {rerun.rss_mb:.0f} |")
    return "\n".join(lines) + "\n"
