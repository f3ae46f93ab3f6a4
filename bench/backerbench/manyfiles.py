"""bench/many-files' procedure: Backer's (and restic's) peak memory and time
on a tree of many small files."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT, WORK
from .datasets import build_many_files
from .timing import timed_or_exit


def run(a):
    """a: bench/many-files' parsed command line (files, restic, limit_mib)."""
    data = WORK / "many-small"
    build_many_files(data, a.files)
    backer = os.environ.get("BACKER_BIN", str(ROOT / "target" / "release" / "backer"))
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        env = dict(os.environ, BACKER_PASSWORD="bench", RESTIC_PASSWORD="bench")
        repo = Path(tmp) / "backer"
        subprocess.run([backer, "init", "-q", "-r", str(repo)], env=env, check=True, stdout=subprocess.DEVNULL)
        wall, rss = timed_or_exit("many-files", "many-files-backer-backup",
                                  [backer, "backup", "-q", "-r", str(repo), str(data)], env)
        print(f"backer: {a.files} files, first backup {wall:.1f} s, peak RSS {rss:.0f} MiB")
        wall2, rss2 = timed_or_exit("many-files", "many-files-backer-rerun",
                                    [backer, "backup", "-q", "-r", str(repo), str(data)], env)
        print(f"backer: unchanged re-run {wall2:.1f} s, peak RSS {rss2:.0f} MiB")
        if a.restic:
            rrepo = Path(tmp) / "restic"
            subprocess.run(["restic", "init", "-q", "-r", str(rrepo)], env=env, check=True)
            rw, rr = timed_or_exit("many-files", "many-files-restic-backup",
                                   ["restic", "-q", "-r", str(rrepo), "backup", str(data)], env)
            print(f"restic: first backup {rw:.1f} s, peak RSS {rr:.0f} MiB")
        peak = max(rss, rss2)
        if peak > a.limit_mib:
            sys.exit(f"many-files: peak RSS {peak:.0f} MiB is above the {a.limit_mib:.0f} MiB limit")
        print(f"many-files: peak RSS {peak:.0f} MiB, within {a.limit_mib:.0f} MiB")
