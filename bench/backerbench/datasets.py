"""The datasets: building and caching them, and checking restores against them.

tree   a copy of a real system tree (TreeDataset, build_dataset)
large  one file generated from a seed, then changed (LargeDataset)
many   bench/many-files' tree of small files (build_many_files)

Also where restored trees go until a dataset is done (discard_tree, TRASH)."""

import datetime
import glob
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

from .common import GiB, LOGS, MiB, ROOT, WORK, log


# What gets copied into the dataset. The full one is real-world mixed content:
# text, man pages, already-compressed .gz, locale data, ELF libraries, symlinks.
FULL_SOURCES = ["/usr/share", "/usr/lib/x86_64-linux-gnu"]
# The small one keeps the same mix (text, .gz, binary tz files, two ELF libs,
# symlinks) at ~8 MB so CI can run the whole harness in seconds.
SMALL_SOURCES = [
    "/usr/share/zoneinfo",
    "/usr/share/doc/[a-d]*",
    "/usr/lib/x86_64-linux-gnu/libz.so*",
    "/usr/lib/x86_64-linux-gnu/libzstd.so*",
]


def build_dataset(small):
    """Copy the source trees into bench/work/data-{small,full} once.

    A copy (not the live /usr) so the data cannot change under us between tools
    or between runs (apt installs write to /usr/share). A JSON stamp next to it
    records what it is; without the stamp the copy is redone from scratch.
    """
    name = "data-small" if small else "data-full"
    data = WORK / name
    stamp = WORK / f"{name}.json"
    if data.is_dir() and stamp.is_file():
        return data, json.loads(stamp.read_text())

    log(f"building dataset {data} (once; cached)")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    sources = []
    for pattern in SMALL_SOURCES if small else FULL_SOURCES:
        sources += sorted(glob.glob(pattern))
    with open(LOGS / "dataset-copy.log", "w") as errlog:
        for src in sources:
            # Keep the source's place in the tree (usr/share/..., usr/lib/...),
            # so the copy looks like a real system tree.
            dest = data / src.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            # cp -a keeps modes, times, symlinks. It exits 1 on any unreadable
            # or special file; those are skipped and logged, not fatal.
            subprocess.run(["cp", "-a", src, str(dest)], stderr=errlog)
    # Sockets, fifos and devices are not backup data any tool agrees on; drop them
    # so every tool gets exactly regular files, directories and symlinks.
    subprocess.run(["find", str(data), "(", "-type", "s", "-o", "-type", "p", "-o",
                    "-type", "b", "-o", "-type", "c", ")", "-delete"])
    files, nbytes, dirs, links = tree_stats(data)
    info = {
        "sources": SMALL_SOURCES if small else FULL_SOURCES,
        "files": files, "dirs": dirs, "symlinks": links, "bytes": nbytes,
        "unique_bytes": unique_bytes(data),
        "built": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    stamp.write_text(json.dumps(info, indent=1))
    return data, info


def tree_stats(path):
    m = manifest(path)
    kinds = [e[0] for e in m.values()]
    nbytes = sum(e[1] for e in m.values() if e[0] == "f")
    return kinds.count("f"), nbytes, kinds.count("d"), kinds.count("l")


def unique_bytes(path):
    """Bytes in regular files counting each inode once: /usr/lib has hardlinked
    files (the Mesa DRI drivers), which tar stores once and backup tools read
    once per path but store once by dedup."""
    seen, total = set(), 0
    for dirpath, _, fnames in os.walk(path):
        for f in fnames:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def manifest(root):
    """relative path -> (kind, size-or-target). Cheap (stat only), used to check
    that a restore brought back the whole tree, not just that the tool exited 0."""
    out = {}
    root = str(root)
    for dirpath, dnames, fnames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dnames:
            p = os.path.join(dirpath, d)
            if os.path.islink(p):   # os.walk lists symlinks-to-dirs as dirs
                out[os.path.normpath(os.path.join(rel, d))] = ("l", os.readlink(p))
            else:
                out[os.path.normpath(os.path.join(rel, d))] = ("d", 0)
        for f in fnames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            key = os.path.normpath(os.path.join(rel, f))
            if os.path.islink(p):
                out[key] = ("l", os.readlink(p))
            else:
                out[key] = ("f", st.st_size)
    return out


def warm_page_cache(data):
    """Read every file once so all tools (and the floors) start from the same,
    warm page cache. Nothing is ever dropped from the cache: dropping needs root
    and would make the numbers depend on the disk more than on the tools."""
    log("warming page cache: cat every file of the dataset > /dev/null")
    subprocess.run(f"find {shlex.quote(str(data))} -type f -print0 | xargs -0 cat > /dev/null",
                   shell=True, check=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


# Paths every tool's include/filter syntax takes literally (no glob characters).
PLAIN_PATH = re.compile(r"[A-Za-z0-9._+/-]+")


def pick_one_file(data, ref):
    """The file the "restore of one file" step restores from the tree: the
    regular file whose size is closest to 2 MiB (ties: the first path), among
    those with a plain name and one link. Deterministic for a given dataset."""
    cands = [(abs(v[1] - 2 * MiB), rel) for rel, v in ref.items()
             if v[0] == "f" and v[1] > 0 and PLAIN_PATH.fullmatch(rel)
             and os.lstat(data / rel).st_nlink == 1]
    return min(cands)[1] if cands else None


class TreeDataset:
    """The system tree (build_dataset)."""
    key = "tree"
    changes = False

    def __init__(self, small):
        self.path, self.info = build_dataset(small)
        self.ref = manifest(self.path)
        self.one = pick_one_file(self.path, self.ref)
        if self.one:
            f = self.path / self.one
            self.one_bytes, self.one_sha = f.stat().st_size, sha256_file(f)

    def describe(self):
        i = self.info
        return (f"{i['files']} files, {i['dirs']} dirs, {i['symlinks']} symlinks, "
                f"{i['bytes'] / MiB:.1f} MiB in files ({i['unique_bytes'] / MiB:.1f} MiB counting "
                f"hardlinked files once); a `cp -a` copy of {', '.join(i['sources'])} "
                f"(built {i['built']})")

    def warm(self):
        warm_page_cache(self.path)

    def verify_restore(self, target):
        return verify_restore(target, self.path, self.ref)

    def verify_one(self, target):
        return verify_single(target, self.one, self.one_bytes, self.one_sha)

    def done(self):
        pass


# The large-file dataset. LARGE_FORMAT goes up whenever the generator below
# changes what it writes, so cached files made by an older one are remade.
LARGE_FORMAT = 1
LARGE_SEED = 20261126
LARGE_BLOCK = 64 * 1024                 # the unit of the changes
LARGE_SEGMENT = (512 * 1024, 1536 * 1024)   # text / random segment lengths
LARGE_CHANGE = 0.01                     # share of blocks overwritten; share of bytes inserted
LARGE_MTIME = {"v1": 1767225600, "v2": 1767312000}    # 2026-01-01 and -02, 00:00 UTC
# Kopia caches every data blob it reads (content cache, 5 GB soft limit by
# default): a restore of the large file would write a second copy of it. On
# that dataset its cache gets this hard limit instead, so the disk holds out.
KOPIA_LARGE_CACHE_MB = 512


def text_table():
    """bytes.translate table turning uniform random bytes into text-like ones:
    lower-case letters, spaces, a little punctuation and newlines in about
    English proportions (order-0 entropy ~4.2 bits: zstd halves it)."""
    weights = {" ": 40, "e": 26, "t": 19, "a": 17, "o": 16, "i": 15, "n": 15, "s": 13,
               "h": 12, "r": 12, "d": 9, "l": 8, "u": 6, "c": 6, "m": 5, "w": 4, "f": 4,
               "g": 4, "y": 4, "p": 4, "b": 3, ",": 2, ".": 2, "\n": 2, "v": 2, "k": 1,
               "x": 1, "j": 1, "q": 1, "z": 1}
    chars, total = list(weights), sum(weights.values())
    out, acc, ci = bytearray(), 0, 0
    for i in range(256):
        pos = (i + 0.5) * total / 256
        while acc + weights[chars[ci]] <= pos:
            acc += weights[chars[ci]]
            ci += 1
        out += chars[ci].encode()
    return bytes(out)


def large_blocks(size, seed, counts):
    """The large file's version 1 as LARGE_BLOCK-sized pieces: segments
    alternating between text-like and random bytes, all from one seeded
    generator. counts["text"] gets the number of text-like bytes."""
    rng, table = random.Random(seed), text_table()
    buf, left, text = bytearray(), size, True
    while left:
        n = min(left, rng.randrange(LARGE_SEGMENT[0], LARGE_SEGMENT[1] + 1))
        seg = rng.getrandbits(n * 8).to_bytes(n, "little")
        if text:
            seg = seg.translate(table)
            counts["text"] += n
        buf += seg
        left -= n
        text = not text
        while len(buf) >= LARGE_BLOCK:
            yield bytes(buf[:LARGE_BLOCK])
            del buf[:LARGE_BLOCK]
    if buf:
        yield bytes(buf)


def large_changes(size):
    """Where version 2 differs from version 1 (seeded; independent of the
    content): the set of overwritten block numbers, the sorted insert offsets
    (in version 1's coordinates)."""
    nblocks = -(-size // LARGE_BLOCK)
    n = max(1, round(nblocks * LARGE_CHANGE))
    crng = random.Random(LARGE_SEED + 1)
    over = set(crng.sample(range(nblocks), n))
    return over, sorted(crng.randrange(size) for _ in range(n))


def large_v2(blocks, size):
    """Version 2 as pieces, from version 1's LARGE_BLOCK-sized blocks: the
    chosen blocks replaced by new random bytes, a LARGE_BLOCK of new random
    bytes inserted at each insert offset. The new bytes come from their own
    seeded generator, in file order."""
    over, inserts = large_changes(size)
    drng = random.Random(LARGE_SEED + 2)

    def new(n):
        return drng.getrandbits(n * 8).to_bytes(n, "little")

    ii = 0
    for k, blk in enumerate(blocks):
        pos = k * LARGE_BLOCK
        if k in over:
            blk = new(len(blk))
        end = pos + len(blk)
        while ii < len(inserts) and inserts[ii] < end:
            cut = inserts[ii] - pos
            yield blk[:cut]
            yield new(LARGE_BLOCK)
            blk, pos = blk[cut:], inserts[ii]
            ii += 1
        yield blk


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# Restored trees are set aside here and deleted when the dataset is done.
# ext4 without a journal (this machine's root) skips inodes freed in the last
# minute (more while their inode table is not written back) when it allocates
# new ones, looking each up (fs/ext4/ialloc.c, recently_deleted), so a restore
# right after another restore's 56k files were deleted paid for it: 1.5 s
# became 8.5-9.4 s for Backer, and restic's restores varied as much, depending
# on who went first. Creating 50k empty files here: 4 s, 8-10 s just after
# deleting as many.
TRASH = WORK / "trash"
TRASH_EMPTIED = WORK / "trash.emptied"
TRASH_QUIET_S = 360
# Below this much free disk a restored tree is deleted at once, and said so.
TRASH_MIN_FREE = 8 * GiB


def discard_tree(path):
    if not path.exists():
        return
    if free_bytes(WORK) < TRASH_MIN_FREE:
        log(f"short of disk: deleting {path.relative_to(ROOT)} now; the next "
            "restore may be slowed by the inodes it frees")
        shutil.rmtree(path, ignore_errors=True)
        return
    TRASH.mkdir(parents=True, exist_ok=True)
    path.rename(TRASH / f"{path.parent.name}-{path.name}-{time.monotonic_ns()}")


def empty_trash():
    if TRASH.exists():
        shutil.rmtree(TRASH, ignore_errors=True)
        subprocess.run(["sync"])
        TRASH_EMPTIED.touch()


def wait_for_freed_inodes():
    """After trash was emptied, wait until ext4 reuses its inodes freely."""
    if not TRASH_EMPTIED.exists():
        return
    left = TRASH_QUIET_S - (time.time() - TRASH_EMPTIED.stat().st_mtime)
    if left > 0:
        log(f"waiting {left:.0f} s: many files were deleted just now, and ext4 "
            "avoids their inodes for a while (it would slow the first restore)")
        time.sleep(left)


class LargeDataset:
    """One big file in two versions (see bench/run's docstring), always at
    NAME/big.img, the path every tool backs up.

    NAME.json records the parameters and both versions' size and SHA-256; it
    is made once (regenerated when the parameters change). Version 1 is cached
    as NAME.versions/v1.img when the disk has room for the cache and a tool's
    run beside it; use("v1") then renames it to big.img, and done() back.
    Without that room, use("v1") generates it again from the seed for each
    tool (checked against the SHA-256). use("v2") writes version 2 from
    version 1 (reads it, applies the seeded changes; checked against the
    SHA-256) and renames it to big.img; drop() deletes it once it is backed up
    (the restores are checked against the hash). Renames are atomic: after a
    crash the next run puts things back."""
    key = "large"
    changes = True
    FILE = "big.img"

    def __init__(self, small, size):
        name = "data-large-small" if small else "data-large"
        self.path = WORK / name
        self.versions = WORK / f"{name}.versions"
        self.stamp = WORK / f"{name}.json"
        self.big = self.path / self.FILE
        self.v1 = self.versions / "v1.img"
        self.v2tmp = self.versions / "v2.tmp"
        self.one = self.FILE
        self.params = {"format": LARGE_FORMAT, "seed": LARGE_SEED, "bytes": size,
                       "block": LARGE_BLOCK, "segments": list(LARGE_SEGMENT),
                       "change": LARGE_CHANGE}
        self.current = None
        self.path.mkdir(parents=True, exist_ok=True)
        self.versions.mkdir(parents=True, exist_ok=True)
        # A run that died while the cached version 1 was at big.img: put it back
        # (version 2 has another mtime).
        if self.big.exists() and not self.v1.exists() \
                and int(self.big.stat().st_mtime) == LARGE_MTIME["v1"]:
            os.rename(self.big, self.v1)
        self.put_back()
        # Version 1 is kept only if a tool's run still fits beside it.
        room = free_bytes(self.versions) + (self.v1.stat().st_size if self.v1.exists() else 0)
        self.keep = room >= size + self.run_need(cached=True)
        self.info = self.build()
        if self.v1.exists() and not self.keep:
            self.v1.unlink()
            log(f"large file: only {room / 2**30:.1f} GiB free with its cache in "
                f"{self.versions.parent}: version 1 is not kept, but generated again for each "
                "tool (untimed)")

    def run_need(self, cached):
        """Disk one tool's run on this dataset may need at its peak, besides
        the cache: the repository (up to ~1.5x the file after the changes;
        Kopia's, whose 4 MiB chunks make the changes cost most) plus a restore
        (1x), or, without the cache, while version 2 is written, both versions
        plus the repository (~0.85x then). Plus Kopia's content cache (capped
        at KOPIA_LARGE_CACHE_MB on this dataset) and 512 MiB to spare."""
        size = self.params["bytes"]
        return int((2.5 if cached else 2.9) * size) + (KOPIA_LARGE_CACHE_MB + 512) * MiB

    def put_back(self):
        """Version 1 back into the cache (or deleted, when it is not kept);
        version 2 or a leftover deleted."""
        if self.big.exists():
            if self.current == "v1" and getattr(self, "keep", False) and not self.v1.exists():
                os.rename(self.big, self.v1)
            else:
                self.big.unlink()
        self.v2tmp.unlink(missing_ok=True)
        self.versions.joinpath("v1.tmp").unlink(missing_ok=True)
        self.current = None

    def manifest_ok(self):
        try:
            info = json.loads(self.stamp.read_text())
            if info.get("params") == self.params:
                return info
        except (OSError, ValueError):
            pass
        return None

    def build(self):
        info = self.manifest_ok()
        if info is not None:
            if self.v1.exists() and self.v1.stat().st_size != info["v1"]["bytes"]:
                self.v1.unlink()
            return info
        size = self.params["bytes"]
        self.v1.unlink(missing_ok=True)
        self.stamp.unlink(missing_ok=True)
        log(f"generating the large-file dataset ({size / MiB:.0f} MiB)"
            + (f" into {self.v1} (once; cached)" if self.keep else " (its hashes only: "
               "not enough disk to cache it)"))
        t0 = time.monotonic()
        counts = {"text": 0, "v2": 0}
        h2 = hashlib.sha256()

        def v2(piece):
            h2.update(piece)
            counts["v2"] += len(piece)
        out = self.versions / "v1.tmp" if self.keep else None
        h1 = self.write_v1(out, counts, v2)
        over, inserts = large_changes(size)
        if out is not None:
            os.rename(out, self.v1)
        info = {"params": self.params, "file": self.FILE,
                "text_bytes": counts["text"],
                "overwritten_blocks": len(over), "inserts": len(inserts),
                "inserted_bytes": len(inserts) * LARGE_BLOCK,
                "v1": {"bytes": size, "sha256": h1, "mtime": LARGE_MTIME["v1"]},
                "v2": {"bytes": counts["v2"], "sha256": h2.hexdigest(),
                       "mtime": LARGE_MTIME["v2"]},
                "built": datetime.datetime.now().isoformat(timespec="seconds"),
                "build_s": round(time.monotonic() - t0, 1)}
        self.stamp.write_text(json.dumps(info, indent=1))
        log(f"large-file dataset generated in {info['build_s']} s")
        return info

    def write_v1(self, out, counts=None, v2=None):
        """Generate version 1 from the seed into the file out (None: nowhere);
        v2(piece), if given, gets version 2's pieces. Returns version 1's
        SHA-256."""
        size = self.params["bytes"]
        counts = counts if counts is not None else {"text": 0}
        h1 = hashlib.sha256()
        f1 = open(out, "wb", buffering=8 * MiB) if out is not None else None
        try:
            def v1_blocks():
                for blk in large_blocks(size, LARGE_SEED, counts):
                    if f1 is not None:
                        f1.write(blk)
                    h1.update(blk)
                    yield blk
            if v2 is None:
                for _ in v1_blocks():
                    pass
            else:
                for piece in large_v2(v1_blocks(), size):
                    v2(piece)
        finally:
            if f1 is not None:
                f1.close()
        if out is not None:
            os.utime(out, (LARGE_MTIME["v1"], LARGE_MTIME["v1"]))
        return h1.hexdigest()

    def use(self, v):
        """Put version v at big.img."""
        if self.current == v:
            return
        t0 = time.monotonic()
        if v == "v1":
            self.put_back()
            if self.v1.exists():
                os.rename(self.v1, self.big)
            else:
                tmp = self.versions / "v1.tmp"
                if self.write_v1(tmp) != self.info["v1"]["sha256"]:
                    tmp.unlink()
                    raise RuntimeError(f"version 1 of {self.big} came out different from its "
                                       f"manifest {self.stamp}: delete the manifest to regenerate")
                os.rename(tmp, self.big)
                log(f"large file: version 1 generated into {self.big} in "
                    f"{time.monotonic() - t0:.1f} s (untimed)")
        else:
            if self.current != "v1":
                self.use("v1")
                t0 = time.monotonic()
            h = hashlib.sha256()
            with open(self.big, "rb") as f, open(self.v2tmp, "wb", buffering=8 * MiB) as out:
                for piece in large_v2(iter(lambda: f.read(LARGE_BLOCK), b""),
                                      self.params["bytes"]):
                    out.write(piece)
                    h.update(piece)
            if h.hexdigest() != self.info["v2"]["sha256"]:
                self.v2tmp.unlink()
                raise RuntimeError(f"version 2 of {self.big} came out different from its "
                                   f"manifest {self.stamp}: delete the manifest to regenerate")
            os.utime(self.v2tmp, (LARGE_MTIME["v2"], LARGE_MTIME["v2"]))
            if self.keep and not self.v1.exists():
                os.rename(self.big, self.v1)        # version 1 back to the cache
            else:
                self.big.unlink()
            os.rename(self.v2tmp, self.big)
            log(f"large file: version 2 written to {self.big} in "
                f"{time.monotonic() - t0:.1f} s (untimed)")
        self.current = v

    def drop(self):
        """Delete version 2 once it is backed up (disk space)."""
        if self.current == "v2":
            self.put_back()

    def done(self):
        self.put_back()

    def short_of_disk(self):
        """Why a tool's run would not fit on the disk now, or None."""
        need = self.run_need(cached=self.v1.exists())
        free = free_bytes(WORK)
        if free < need:
            return (f"not run: {free / 2**30:.1f} GiB free in {WORK.relative_to(ROOT)}, a run "
                    f"on the large file may need {need / 2**30:.1f}")
        return None

    def describe(self):
        i, p = self.info, self.params
        return (f"one file, {i['v1']['bytes'] / MiB:.0f} MiB: segments of "
                f"{p['segments'][0] // 1024}-{p['segments'][1] // 1024} KiB alternating between "
                f"text-like bytes ({100 * i['text_bytes'] / i['v1']['bytes']:.0f} % of the file) "
                f"and random bytes, seed {p['seed']}; then changed: {i['overwritten_blocks']} of "
                f"its {p['block'] // 1024} KiB blocks ({100 * p['change']:.0f} %) overwritten in "
                f"place with new random bytes, and {i['inserts']} runs of {p['block'] // 1024} KiB "
                f"of new random bytes ({i['inserted_bytes'] / MiB:.1f} MiB) inserted at random "
                f"offsets: {i['v2']['bytes'] / MiB:.1f} MiB")

    def warm(self):
        if self.v1.exists():
            log("warming page cache: the large file's version 1 > /dev/null "
                "(version 2 is written right before it is backed up)")
            subprocess.run(["cat", str(self.v1)], stdout=subprocess.DEVNULL, check=True)

    def verify_restore(self, target):
        # After the last backup the newest snapshot holds version 2.
        return verify_single(target, self.FILE, self.info["v2"]["bytes"],
                             self.info["v2"]["sha256"])

    def verify_one(self, target):
        return self.verify_restore(target)


def verify_single(target, rel, size, sha):
    """A restore meant to bring back one file: exactly one regular file (and
    nothing but directories) under target, named like rel, same size and
    SHA-256 as the original."""
    found = []
    for dirpath, dnames, fnames in os.walk(target):
        found += [os.path.join(dirpath, f) for f in fnames]
        found += [os.path.join(dirpath, d) for d in dnames
                  if os.path.islink(os.path.join(dirpath, d))]
    if not found:
        return f"nothing restored under {target}"
    if len(found) > 1:
        return f"restore differs: {len(found)} entries restored, expected only {rel}"
    got = found[0]
    where = os.path.relpath(got, target)
    if os.path.islink(got) or not os.path.isfile(got):
        return f"restore differs: RESTORE/{where} is not a regular file"
    if os.path.basename(got) != os.path.basename(rel):
        return f"restore differs: restored RESTORE/{where}, expected a file named {rel}"
    n = os.path.getsize(got)
    if n != size:
        return f"restore differs: RESTORE/{where} has {n} bytes, expected {size}"
    if sha256_file(got) != sha:
        return f"restore differs: RESTORE/{where} has other content (SHA-256)"
    return f"ok ({size} bytes, SHA-256 matches, at RESTORE/{where})"


def verify_restore(target, data, ref):
    """Find the dataset inside the restore dir and compare it with the original
    by path, type, size and symlink target. Tools differ in where they put it:
    some keep the absolute path (restic; Borg too, without the leading "/":
    `borg extract` in RESTORE gives RESTORE/<dataset path> either way), some
    only the last component, some (Kopia) restore the snapshot root's contents
    straight into RESTORE. The "ok" line says which one it found."""
    candidates = [target / str(data).lstrip("/"), target / data.name, target]
    root = next((c for c in candidates if c.is_dir() and (c / "usr").is_dir()), None)
    if root is None:
        return f"restored tree not found under {target}"
    got = manifest(root)
    missing = [k for k in ref if k not in got]
    differ = [k for k in ref if k in got and got[k] != ref[k]]
    extra = [k for k in got if k not in ref]
    if missing or differ or extra:
        ex = (missing + differ + extra)[:3]
        return (f"restore differs: {len(missing)} missing, {len(differ)} different, "
                f"{len(extra)} extra (e.g. {ex})")
    where = os.path.relpath(root, target)
    return f"ok ({len(ref)} entries match, at RESTORE/{'' if where == '.' else where})"


def build_many_files(path, n):
    """bench/many-files' dataset: n files of 0-4 KiB of distinct content in a
    deep tree at path, written once (path.count records n)."""
    stamp = path.with_suffix(".count")
    if path.is_dir() and stamp.is_file() and stamp.read_text().strip() == str(n):
        return
    print(f"many-files: writing {n} files under {path} (once)", file=sys.stderr)
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(1)
    # 100 files per directory, directories 4 levels deep: a tree like a
    # mail spool or a package cache, not one flat directory.
    for i in range(n):
        d = path / f"{i // 1000000:02d}" / f"{(i // 10000) % 100:02d}" / f"{(i // 100) % 100:02d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(0, 4096)
        # Distinct content per file: a header with the index, then filler.
        body = (f"file {i}\n".encode() + rng.randbytes(size))[:size]
        with open(d / f"f{i % 100:02d}.dat", "wb") as f:
            f.write(body)
    stamp.write_text(str(n))
