"""bench/slow-create's procedure: restores where creating a file is slow,
right after a large delete and onto bench/slowfs (a FUSE passthrough adding a
delay to every create)."""

import os
import shutil
import signal
import subprocess
import sys
import time

from . import timing
from .common import BENCH, CACHE, LOGS, log
from .common import WORK as BENCH_WORK
from .datasets import build_dataset, manifest, verify_restore
from .tools import Backer, Restic

WORK = BENCH_WORK / "slow-create"
SLOWFS = CACHE / "peers" / "bin" / "slowfs"


def build_slowfs():
    src = BENCH / "slowfs"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if SLOWFS.exists() and SLOWFS.stat().st_mtime >= newest:
        return
    log("building bench/slowfs (once; cached)")
    SLOWFS.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-o", str(SLOWFS), "."], cwd=src, check=True)


class Mount:
    """slowfs over a fresh backing directory, unmounted however the step ends."""

    def __init__(self, backing, mnt, delay):
        for d in (backing, mnt):
            d.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt
        self.log = open(WORK / "slowfs.log", "a")
        self.proc = subprocess.Popen([str(SLOWFS), "-delay", delay, str(backing), str(mnt)],
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"slow-create: slowfs did not mount {mnt}; see {WORK / 'slowfs.log'}")
            time.sleep(0.05)

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            subprocess.run(["umount", "-l", str(self.mnt)])
            self.proc.kill()
        self.log.close()


def run(a):
    """a: bench/slow-create's parsed command line (small, rounds, delay, cases,
    tools). Prints the table; exits non-zero on a failed step or restore."""
    timing.BG = timing.BgBuild()
    cases = a.cases.split(",")
    data, info = build_dataset(a.small)
    ref = manifest(data)
    tools = {"backer": Backer(), "restic": Restic()}
    chosen = []
    for name in a.tools.split(","):
        t = tools.get(name)
        if t is None:
            sys.exit(f"slow-create: unknown tool {name!r}; choose from {', '.join(tools)}")
        why = t.missing()
        if why:
            sys.exit(f"slow-create: {why}")
        chosen.append(t)
    if "slow-create" in cases:
        if not os.path.exists("/dev/fuse"):
            sys.exit("slow-create: /dev/fuse is missing here; run with --cases after-delete")
        build_slowfs()
    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True)
    log(f"dataset {data}: {info['files']} files, {info['dirs']} dirs")
    for t in chosen:
        t.base = WORK / t.name
        t.tag = f"slow-{t.name}"
        repo = t.base / "repo"
        t.base.mkdir(parents=True)
        for step, argv in (("init", t.init(repo)), ("backup", t.backup(repo, data))):
            s = t.timed(step, argv)
            if not s.ok:
                sys.exit(f"slow-create: {t.name} {step} failed: {s.note}")
    results = {(c, t.name): [] for c in cases for t in chosen}
    # A tree of the dataset's size, deleted right before each after-delete restore.
    victim = WORK / "victim"
    counter = 0
    for rnd in range(a.rounds):
        order = chosen if rnd % 2 == 0 else chosen[::-1]
        for case in cases:
            for t in order:
                counter += 1
                repo = t.base / "repo"
                mount = None
                if case == "after-delete":
                    subprocess.run(["cp", "-a", str(data), str(victim)], check=True)
                    subprocess.run(["sync"])
                    shutil.rmtree(victim)
                    target = WORK / f"target-{counter}"
                else:
                    mount = Mount(WORK / f"backing-{counter}", WORK / f"mnt-{counter}", a.delay)
                    target = mount.mnt / "restore"
                try:
                    s = t.timed(f"{case}-{rnd}", t.restore(repo, target))
                    check = verify_restore(target, data, ref) if s.ok else s.note
                finally:
                    if mount:
                        mount.close()
                if not check.startswith("ok"):
                    sys.exit(f"slow-create: {t.name} {case}: {check}")
                results[(case, t.name)].append(s)
                # Kept until the end: deleting it now would slow the next restore.
    print()
    print(f"dataset: {info['files']} files, {info['dirs']} dirs; slowfs delay {a.delay} per create; "
          f"best of {a.rounds} rounds")
    print()
    print("| case | " + " | ".join(f"{t.name} s | {t.name} RSS MiB" for t in chosen) + " | restic / Backer |")
    print("|---|" + "---:|---:|" * len(chosen) + "---:|")
    for case in cases:
        best = {t.name: min(results[(case, t.name)], key=lambda s: s.wall_s) for t in chosen}
        cells = " | ".join(f"{best[t.name].wall_s:.2f} | {best[t.name].rss_mb:.0f}" for t in chosen)
        ratio = (f"{best['restic'].wall_s / best['Backer'].wall_s:.2f}×"
                 if "restic" in best and "Backer" in best else "—")
        print(f"| {case} | {cells} | {ratio} |")
    print()
    for case in cases:
        for t in chosen:
            walls = ", ".join(f"{s.wall_s:.2f}" for s in results[(case, t.name)])
            print(f"- {case}, {t.name}: every round {walls} s")
    shutil.rmtree(WORK, ignore_errors=True)
