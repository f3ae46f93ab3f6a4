"""The machine's floor on the tree's bytes: tar, tar | zstd, and zstd's own
per-core benchmark."""

import re
import shlex
import subprocess
from dataclasses import asdict

from .common import LOGS, WORK
from .timing import timed


ZSTD_LEVELS = [1, 2, 3]


def measure_floors(data):
    """What the machine can do with these bytes at all, as one stream: no
    chunking, hashing, dedup, encryption or per-file work.

    GNU tar skips reading file contents when its archive is /dev/null, so the
    stream is always piped (into wc -c, which also gives its size)."""
    parent, name = str(data.parent), data.name
    tar = f"tar -cf - -C {shlex.quote(parent)} {shlex.quote(name)}"
    floors = []

    def run(label, pipeline):
        size_file = LOGS / f"{label}.bytes"
        st = timed(label, ["bash", "-c", f"set -o pipefail; {pipeline} | wc -c > {size_file}"])
        size = int(size_file.read_text()) if st.ok else None
        return st, size

    st, tar_bytes = run("floor-read", tar)
    floors.append({"what": "read: tar | wc -c", "cmd": f"{tar} | wc -c",
                   "step": asdict(st), "out_bytes": tar_bytes})
    for lvl in ZSTD_LEVELS:
        cmd = f"{tar} | zstd -{lvl} -T2 -q -c"
        st, size = run(f"floor-zstd-{lvl}", cmd)
        floors.append({"what": f"zstd -{lvl} -T2", "cmd": cmd, "step": asdict(st),
                       "out_bytes": size})
    return floors, tar_bytes


ZSTD_BENCH_RE = re.compile(
    r"(\d+) -> +(\d+) \(x([\d.]+)\), +([\d.]+) MB/s, +([\d.]+) MB/s")


def measure_zstd_levels(data, small):
    """zstd's own in-memory benchmark on the dataset's tar, one core, the input
    cut into independent 1 MiB blocks: that is roughly what a backup tool does
    (it compresses each ~1 MiB chunk on its own), without reading files or
    hashing. Gives compression and decompression MB/s per core and the ratio
    per level, which is what picks Backer's default level."""
    tarfile = WORK / f"{data.name}.tar"
    if not tarfile.is_file() or tarfile.stat().st_mtime < (WORK / f"{data.name}.json").stat().st_mtime:
        subprocess.run(["tar", "-cf", str(tarfile), "-C", str(data.parent), data.name], check=True)
    rows = []
    for lvl in ZSTD_LEVELS:
        label = f"zstd-bench-{lvl}"
        # -i: seconds each of compression and decompression is repeated for.
        st = timed(label, ["zstd", f"-b{lvl}", "-B1MiB", "-T1", f"-i{1 if small else 3}",
                           str(tarfile)])
        m = ZSTD_BENCH_RE.findall((LOGS / f"{label}.log").read_text(errors="replace"))
        row = {"level": lvl, "step": asdict(st)}
        if st.ok and m:
            src, dst, _, c, d = m[-1]
            row.update(in_bytes=int(src), out_bytes=int(dst),
                       comp_mb_s=float(c), decomp_mb_s=float(d))
        rows.append(row)
    return rows
