"""bench/prune-history's procedure: a long history of snapshots with Backer
and restic side by side, then `forget --keep-last 7 --prune`; writes
bench/PRUNE.md."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BENCH, ROOT, WORK, du_bytes
from .timing import timed_or_exit

ENV = dict(os.environ, BACKER_PASSWORD="bench", RESTIC_PASSWORD="bench")


def log(msg):
    print(f"prune-history: {msg}", file=sys.stderr, flush=True)


def measure(label, argv):
    """(wall s, peak RSS MiB) of a command; fails loudly."""
    return timed_or_exit("prune-history", f"prune-{label}", argv, ENV)


def files_of(src):
    out = []
    for dirpath, _, names in os.walk(src):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p) and os.stat(p).st_nlink == 1:
                out.append(p)
    out.sort()
    return out


def rewrite(path, round_no):
    """New content of the same size: every 512th byte changed, plus a stamp."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    stamp = f"round {round_no}\n".encode()
    data[: len(stamp)] = stamp[: len(data)]
    for i in range(0, len(data), 512):
        data[i] = (data[i] + round_no) % 256
    with open(path, "wb") as f:
        f.write(data)


def run(a):
    """a: bench/prune-history's parsed command line (snapshots, keep_history).
    Returns 0 if Backer's prune is faster, leaner and leaves a repository no
    larger than restic's, else 1."""
    data = WORK / "data-full"
    if not data.is_dir():
        sys.exit("prune-history: run bench/run once first: it builds bench/work/data-full")
    backer = os.environ.get("BACKER_BIN", str(ROOT / "target" / "release" / "backer"))
    src = WORK / "prune-src"
    if src.exists():
        shutil.rmtree(src)
    log(f"copying the dataset to {src}")
    subprocess.run(["cp", "-a", str(data), str(src)], check=True)
    files = files_of(src)
    per_round = max(1, len(files) // 100)
    log(f"{len(files)} files; rewriting {per_round} (1%) before each of {a.snapshots} snapshots")

    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="prune-"))
    brepo, rrepo = tmp / "backer", tmp / "restic"
    subprocess.run([backer, "init", "-q", "-r", str(brepo)], env=ENV, check=True)
    subprocess.run(["restic", "init", "-q", "-r", str(rrepo)], env=ENV, check=True, stdout=subprocess.DEVNULL)
    history = {"backer": 0.0, "restic": 0.0}
    started = time.time()
    for k in range(a.snapshots):
        if k > 0:
            # A different 1% each round, spread over the tree.
            for p in files[(k * 7919) % 100::100][:per_round]:
                rewrite(p, k)
        w, _ = measure("backer-backup", [backer, "backup", "-q", "-r", str(brepo), str(src)])
        history["backer"] += w
        w, _ = measure("restic-backup", ["restic", "-q", "-r", str(rrepo), "backup", str(src)])
        history["restic"] += w
        if k % 10 == 9:
            log(f"{k + 1} snapshots in {time.time() - started:.0f} s")

    before = {"backer": du_bytes(brepo), "restic": du_bytes(rrepo)}
    results = {}
    for tool, argv in [
        ("backer", [backer, "forget", "-q", "-r", str(brepo), "--keep-last", "7", "--prune"]),
        ("restic", ["restic", "-q", "-r", str(rrepo), "forget", "--keep-last", "7", "--prune"]),
    ]:
        wall, rss = measure(f"{tool}-forget", argv)
        results[tool] = {"wall_s": wall, "rss_mib": rss, "before_mb": before[tool] / 1e6,
                         "after_mb": du_bytes(brepo if tool == "backer" else rrepo) / 1e6,
                         "history_backup_s": history[tool]}
        log(f"{tool}: forget --keep-last 7 --prune {wall:.1f} s, {rss:.0f} MiB peak")
    # Both must still be sound.
    subprocess.run([backer, "check", "-q", "-r", str(brepo)], env=ENV, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["restic", "-q", "-r", str(rrepo), "check"], env=ENV, check=True, stdout=subprocess.DEVNULL)

    b, r = results["backer"], results["restic"]
    lines = [
        "# forget --keep-last 7 --prune after a long history",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {os.cpu_count()} cores",
        f"- history: {a.snapshots} snapshots of bench/work/data-full ({len(files)} files), "
        f"{per_round} files (1%) rewritten with new content before each; Backer and restic "
        "(Debian's, default settings) back up the same states in turn",
        "- then `forget --keep-last 7 --prune` (restic: `forget --keep-last 7 --prune`, default max-unused 5%; "
        "Backer: default --max-unused 2%); wall time and peak RSS from /usr/bin/time; size from `du -sb`",
        "",
        "| tool | prune s | prune peak RSS MiB | repo before MB | repo after MB | 100 backups s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool in ("backer", "restic"):
        x = results[tool]
        lines.append(f"| {tool} | {x['wall_s']:.1f} | {x['rss_mib']:.0f} | {x['before_mb']:.0f} | "
                     f"{x['after_mb']:.0f} | {x['history_backup_s']:.0f} |")
    lines += [
        "",
        f"Ratios (restic / Backer): prune time {r['wall_s'] / b['wall_s']:.2f}x, "
        f"peak memory {r['rss_mib'] / b['rss_mib']:.2f}x, repository after {r['after_mb'] / b['after_mb']:.2f}x, "
        f"the 100 backups {r['history_backup_s'] / b['history_backup_s']:.2f}x.",
        "",
    ]
    (BENCH / "PRUNE.md").write_text("\n".join(lines))
    (WORK / "prune-results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    if not a.keep_history:
        shutil.rmtree(tmp)
        shutil.rmtree(src)
    ok = b["wall_s"] < r["wall_s"] and b["rss_mib"] <= r["rss_mib"] and b["after_mb"] <= r["after_mb"]
    return 0 if ok else 1
