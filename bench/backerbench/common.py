"""Paths, constants and small helpers every part of the bench uses."""

import os
import subprocess
import sys
from pathlib import Path

# bench/backerbench/common.py -> the repository root.
ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "work"
LOGS = WORK / "logs"
CACHE = Path(os.environ.get("BACKER_CACHE", Path.home() / ".cache" / "backer"))
RUSTIC_BIN = CACHE / "peers" / "bin" / "rustic"
KOPIA_BIN = CACHE / "peers" / "bin" / "kopia"
# The detached kopia/rustic build that bench/install-peers --bg starts.
BUILD_PID = CACHE / "peers-build.pid"
PASSWORD = "bench-password-not-a-secret"
MiB = 1024 * 1024
GiB = 1024 * MiB


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(argv, **kw):
    """Run a helper command (untimed), returning its stdout as text."""
    return subprocess.run(argv, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def tail(path, n=15):
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join("    " + l for l in lines[-n:])


def du_bytes(path):
    return int(sh(["du", "-sb", str(path)]).split()[0])
