"""RESULTS.md: the markdown tables, ratios to Backer, targets and notes."""

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .common import MiB
from .datasets import KOPIA_LARGE_CACHE_MB
from .floors import ZSTD_LEVELS
from .timing import Step


def machine_line():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB RAM, Linux {platform.release()}"


def fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def sval(r, k, attr):
    """A successful step's figure, else None."""
    st = r.get("steps", {}).get(k)
    return getattr(st, attr) if st is not None and st.ok else None


def peak(r, keys):
    v = [x for x in (sval(r, k, "rss_mb") for k in keys) if x is not None]
    return max(v) if v else None


def mib(b):
    return b / MiB if b is not None else None


def added_mib(r):
    a, b = r.get("repo_bytes"), r.get("repo_bytes_changed")
    return (b - a) / MiB if a is not None and b is not None else None


@dataclass
class Col:
    head: str               # table header
    chart: str              # name of the measure in the chart, or None (not charted)
    get: object             # result -> number or None
    digits: int
    na: str = None          # the step whose n/a (tool cannot do it) shows as "n/a"


TREE_COLS = [
    Col("first backup s", "first backup", lambda r: sval(r, "backup", "wall_s"), 2),
    Col("first backup CPU s", None, lambda r: sval(r, "backup", "cpu_s"), 2),
    Col("re-run s", "unchanged re-run", lambda r: sval(r, "rerun", "wall_s"), 2),
    Col("restore s", "restore", lambda r: sval(r, "restore", "wall_s"), 2),
    Col("one-file restore s", None, lambda r: sval(r, "restore_one", "wall_s"), 2,
        "restore_one"),
    Col("check --read-data s", "check --read-data", lambda r: sval(r, "check", "wall_s"), 2),
    Col("backup peak RSS MiB", "backup peak memory", lambda r: peak(r, ("backup", "rerun")), 0),
    Col("restore peak RSS MiB", None, lambda r: peak(r, ("restore",)), 0),
    Col("repo MiB", "repository size", lambda r: mib(r.get("repo_bytes")), 1),
]

LARGE_COLS = [
    Col("first backup s", "first backup", lambda r: sval(r, "backup", "wall_s"), 2),
    Col("first backup CPU s", None, lambda r: sval(r, "backup", "cpu_s"), 2),
    Col("re-run s", "unchanged re-run", lambda r: sval(r, "rerun", "wall_s"), 2),
    Col("re-run after changes s", "changed re-run", lambda r: sval(r, "changed", "wall_s"), 2),
    Col("restore s", "restore", lambda r: sval(r, "restore", "wall_s"), 2),
    Col("one-file restore s", "one-file restore", lambda r: sval(r, "restore_one", "wall_s"), 2,
        "restore_one"),
    Col("check --read-data s", "check --read-data", lambda r: sval(r, "check", "wall_s"), 2),
    Col("backup peak RSS MiB", "backup memory",
        lambda r: peak(r, ("backup", "rerun", "changed")), 0),
    Col("restore peak RSS MiB", None, lambda r: peak(r, ("restore",)), 0),
    Col("repo MiB", "repo size", lambda r: mib(r.get("repo_bytes_changed")), 1),
    Col("added by changes MiB", None, added_mib, 1),
]


def cell(r, col, v):
    if v is None and col.na and col.na in r.get("na", {}):
        return "n/a"
    return fmt(v, col.digits)


def row_values(r, cols=TREE_COLS):
    return [c.get(r) for c in cols]


# Other ways of running Backer: each gets its own section next to Backer local
# mode (see variant_section), not a row of the peers' table. System tree only.
VARIANTS = {
    "Backer-server": "Backer through the server (agent → server over mTLS on 127.0.0.1)",
    "Backer-S3": "Backer with the repository on S3 (s3s-fs)",
    "Backer-S3-20ms": "Backer on S3 with 20 ms per request",
    "restic-S3-20ms": "restic on S3 with 20 ms per request",
    "Backer-server-S3": "Backer through the server, repository on S3",
}
# Measured on S3 (s3s-fs behind the counting proxy): one section of their own.
ON_S3 = ("Backer-S3", "Backer-S3-20ms", "restic-S3-20ms", "Backer-server-S3")


def daemon_peak(r, keys, who):
    """Largest peak RSS of daemon `who` over the given steps (successful ones)."""
    vals = [st.daemons[who]["rss_mb"] for k in keys
            for st in [r.get("steps", {}).get(k)]
            if st is not None and st.ok and st.daemons and who in st.daemons
            and st.daemons[who]["rss_mb"] is not None]
    return max(vals) if vals else None


def variant_section(name, r, local, skip_why):
    """Lines of the section for one Backer variant: local mode's row, the
    variant's, and variant / local."""
    cols = TREE_COLS
    heads = [c.head for c in cols]
    out = [f"## {VARIANTS[name]}\n"]
    w = out.append
    ncpu = os.cpu_count()
    w("| | version | " + " | ".join(heads) + " |")
    w("|---|---|" + "---:|" * len(cols))
    lv = row_values(local) if local else None
    if local:
        w(f"| Backer (local mode) | {local['version']} | "
          + " | ".join(cell(local, c, v) for c, v in zip(cols, lv)) + " |")
    else:
        w("| Backer (local mode) | not run in this run (--tools backer) |" + " |" * len(cols))
    if r is None:
        w(f"| {name} | not run: {skip_why} |" + " |" * len(cols))
        return out
    vals = row_values(r)
    cells = [cell(r, c, v) for c, v in zip(cols, vals)]
    ratios = [ratio(v, l) for v, l in zip(vals, lv or [None] * len(cols))]
    bk = r["steps"].get("backup")
    if name == "Backer-server":
        # CPU: the CLI's plus the server's and the agent's.
        i = heads.index("first backup CPU s")
        if bk is not None and bk.ok:
            vals[i] = bk.cpu_s + sum((d["cpu_s"] or 0) for d in (bk.daemons or {}).values())
            cells[i] = fmt(vals[i])
            ratios[i] = ratio(vals[i], lv[i] if lv else None)
        # Peak RSS: server + agent; the CLI only waits.
        for head, keys in (("backup peak RSS MiB", ("backup", "rerun")),
                           ("restore peak RSS MiB", ("restore",))):
            i = heads.index(head)
            s_mb, a_mb = daemon_peak(r, keys, "server"), daemon_peak(r, keys, "agent")
            both = s_mb + a_mb if s_mb is not None and a_mb is not None else None
            cells[i] = f"{fmt(s_mb, 0)} + {fmt(a_mb, 0)}" if both is not None else "—"
            ratios[i] = ratio(both, lv[i] if lv else None)
    w(f"| {name} | {r['version']} | " + " | ".join(cells) + " |")
    w(f"| {name} / Backer (local) | | " + " | ".join(ratios) + " |")
    w("")
    w(f"Both rows were measured in the same run, same dataset. Ratios are {name} / "
      "local mode: above 1× means the variant is slower / bigger. — means not measured "
      "or the step failed.")
    w("")
    if name == "Backer-server":
        init = r["steps"].get("init")
        lifetime = any(d["peak"] != "step" for st in r["steps"].values()
                       for d in (st.daemons or {}).values())
        w(f"- **backer-server and backer-agent run on the same machine and share the same "
          f"{ncpu} cores** with each other (and with the CLI, which only submits the job and "
          "waits); on a real network the agent and the server would each have their own.")
        w("- Backup and re-run: wall time of `backer backup h1 DATA --wait -q`; restore: "
          "`backer restore latest --client h1 --target RESTORE --wait -q` (the agent writes "
          "the tree to RESTORE/<dataset path>), one-file restore: the same with `--include "
          "PATH`; both from submitting the job to its end. "
          "check: `backer check --read-data` on the server's repository directory, run "
          "locally, as in local mode.")
        w("- First backup CPU: the CLI's plus backer-server's and backer-agent's user+system "
          "time over the step (/proc/PID/stat).")
        w("- Peak RSS: `server + agent`, each process's VmHWM "
          + ("(a lifetime peak: resetting it with clear_refs failed)" if lifetime else
             "reset (`echo 5 > /proc/PID/clear_refs`) just before the step and read right "
             "after it, so it is the peak during that step")
          + "; backup is the larger of first backup and re-run. For local mode it is the "
          "CLI's peak RSS; the ratio compares server + agent with it (the sum of two peaks "
          "that need not coincide: an upper bound).")
        if init is not None and init.ok:
            w(f"- Set-up, not in the table: server start, admin certificate, client added, "
              f"agent enrolled and started, until the server lists it connected: "
              f"{init.wall_s:.2f} s wall.")
    out.extend(result_notes([r]))
    return out


def object_storage_section(results, skips):
    """The S3 rows next to the directory ones they are compared with: times,
    requests counted by the proxy, and the ratios the targets are set in."""
    by = {r["tool"]: r for r in results}
    out = ["## Object storage (s3s-fs behind a request-counting proxy)\n"]
    w = out.append
    steps = (("restore", "restore"), ("rerun", "unchanged re-run"),
             ("check", "check --read-data"))
    w("| | " + " | ".join(f"{h} s | {h} requests" for _, h in steps)
      + " | restore peak RSS MiB | objects in repo |")
    w("|---|" + "---:|---:|" * len(steps) + "---:|---:|")
    names = ("Backer", "Backer-S3", "Backer-S3-20ms", "restic-S3-20ms", "Backer-server",
             "Backer-server-S3")
    for name in names:
        r = by.get(name)
        if r is None:
            why = next((why for n, why in skips if n == name), None)
            if why:
                w(f"| {name} | not run: {why} |" + " |" * (2 * len(steps) + 1))
            continue
        cells = []
        for k, _ in steps:
            cells += [fmt(sval(r, k, "wall_s")), fmt(sval(r, k, "requests"), 0)
                      if sval(r, k, "requests") is not None else "—"]
        rss = peak(r, ("restore",))
        if name.startswith("Backer-server"):
            s_mb, a_mb = (daemon_peak(r, ("restore",), "server"),
                          daemon_peak(r, ("restore",), "agent"))
            rss = s_mb + a_mb if s_mb is not None and a_mb is not None else None
        objs = sval(r, "restore", "objects")
        cells += [fmt(rss, 0), str(objs) if objs is not None else "—"]
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")

    def t(name, k):
        r = by.get(name)
        return sval(r, k, "wall_s") if r else None

    def target(what, got, limit, better="lower"):
        if got is None:
            return f"- {what}: not measured"
        met = got <= limit if better == "lower" else got >= limit
        return (f"- {what}: **{got:.2f}×** (target {'≤' if better == 'lower' else '≥'} "
                f"{limit}×: {'met' if met else 'NOT met'})")
    q = lambda a, b: a / b if a is not None and b else None
    w("Targets (ratios of wall times in this run):\n")
    w(target("S3 restore / directory restore", q(t("Backer-S3", "restore"), t("Backer", "restore")), 1.5))
    w(target("S3 unchanged re-run / directory re-run", q(t("Backer-S3", "rerun"), t("Backer", "rerun")), 1.5))
    w(target("S3 check --read-data / directory check", q(t("Backer-S3", "check"), t("Backer", "check")), 2.0))
    w(target("with 20 ms per request, restic's restore / Backer's",
             q(t("restic-S3-20ms", "restore"), t("Backer-S3-20ms", "restore")), 2.0, "higher"))
    r20 = by.get("Backer-S3-20ms")
    if r20 and sval(r20, "restore", "requests") is not None and sval(r20, "restore", "objects"):
        w(target("requests of a restore / objects in the repository",
                 sval(r20, "restore", "requests") / sval(r20, "restore", "objects"), 1.2))
    w(target("through the server / local mode, restore",
             q(t("Backer-server", "restore"), t("Backer", "restore")), 1.5))
    w(target("through the server, S3 restore / directory restore",
             q(t("Backer-server-S3", "restore"), t("Backer-server", "restore")), 1.5))
    local_rss = peak(by["Backer"], ("restore",)) if "Backer" in by else None
    s3_rss = peak(by["Backer-S3"], ("restore",)) if "Backer-S3" in by else None
    if local_rss is not None and s3_rss is not None:
        extra = s3_rss - local_rss
        w(f"- S3 restore peak RSS − directory restore's: **{extra:+.0f} MiB** (target ≤ +64 MiB: "
          f"{'met' if extra <= 64 else 'NOT met'})")
    w("")
    w("- The S3 server is s3s-fs (crates.io; a real S3 implementation that checks every "
      "signature and keeps objects as files), served by testkit's `s3s-fs-server`: "
      "s3s-fs's own handling and signature checks, with TCP_NODELAY (its binary left each "
      "small response waiting 40 ms for a delayed ACK) and object bytes sent from the file "
      "in 1 MiB reads (it read 4 KiB at a time through a thread pool, a core-second per "
      "450 MB); on 127.0.0.1, on the same cores as the tools (its CPU counts against "
      "every tool's wall time), "
      "behind `s3-latency-proxy` (testkit), which counts requests and, for the -20ms rows, "
      "delays each by 20 ms: a nearby region's round trip. Requests: every HTTP request of "
      "the step. Objects in repo: after the step.")
    w("- Backer, Backer-server: the directory repository rows of this run, for the ratios.")
    rs = by.get("restic-S3-20ms")
    if rs and "check" in rs["steps"] and not rs["steps"]["check"].ok:
        w("- restic's `check` fails on s3s-fs 0.14, calling every pack missing: restic lists "
          "`data/` with a delimiter, which s3s-fs answers without the packs (`restic list "
          "packs` prints nothing); its backup and restore are not affected.")
    out.extend(result_notes([by[n] for n in ON_S3 if n in by]))
    return out


def result_notes(results):
    """Failed steps, n/a steps and the restore checks, one line each."""
    notes = [f"- {r['tool']} {k}: {st.note}" for r in results
             for k, st in r["steps"].items() if st.note]
    notes += [f"- {r['tool']} {k.replace('_', ' ')}: n/a: {why}" for r in results
              for k, why in r.get("na", {}).items()]
    notes += [f"- {r['tool']} {what}: {r[key]}" for r in results
              for key, what in (("restore_check", "restore check"),
                                ("restore_one_check", "one-file restore check"))
              if key in r]
    return notes


def results_table(results, skipped, cols):
    """The tools' rows, skipped tools, then each peer / Backer."""
    out = []
    w = out.append
    w("| tool | version | " + " | ".join(c.head for c in cols) + " |")
    w("|---|---|" + "---:|" * len(cols))
    by_name = {}
    for r in results:
        vals = row_values(r, cols)
        by_name[r["tool"]] = vals
        w(f"| {r['tool']} | {r['version']} | "
          + " | ".join(cell(r, c, v) for c, v in zip(cols, vals)) + " |")
    for name, why in skipped:
        w(f"| {name} | not run: {why} |" + " |" * len(cols))
    bk = by_name.get("Backer")
    for peer in ("restic", "Borg", "rustic", "Kopia"):
        if peer in by_name:
            w(f"| {peer} / Backer | | " + " | ".join(
                ratio(p, b) for p, b in zip(by_name[peer], bk or [None] * len(cols))) + " |")
    w("")
    w("Ratios above 1× mean Backer is faster / smaller / leaner. "
      "— means not measured or the step failed; n/a: the tool cannot do it (see the notes).")
    return out


def chart_lines(chart, md_out):
    if chart is None:
        return []
    if chart["png"] is None:
        return ["", f"({chart['why']}.)"]
    rel = os.path.relpath(chart["png"], Path(md_out).resolve().parent)
    return ["", f"![ratios]({rel})", "",
            "Chart: restic's figure divided by each tool's, per measure (higher is better; "
            "restic is the line at 1)."]


def report(args, started, tree, large, floors, tar_bytes, zlevels, skipped, tools, charts):
    """tree, large: (dataset, merged results) or None when not run."""
    out = []
    w = out.append
    w("# Backer benchmark results\n")
    w(f"- date: {started:%Y-%m-%d %H:%M}")
    w(f"- machine: {machine_line()}")
    names = [n for n, x in (("system tree", tree), ("one large file", large)) if x]
    w(f"- datasets (`{'--small' if args.small else 'full'}`): {', '.join(names) or 'none'}; "
      "each is described in its section")
    w(f"- rounds: {args.repeat}; each number is the best (lowest wall time) of the rounds; "
      "the tool order rotates from round to round")
    w("- page cache: warm and the same for all: the dataset was read once with `cat` "
      "before any run; nothing is dropped from the cache. `sync` before each timed step.")
    w("- restored trees are set aside, not deleted, until the dataset's rounds are over: "
      "on this file system a restore right after a deletion of many files ran up to 6x "
      "slower (see TRASH in bench/backerbench/datasets.py)")
    results_all = (tree[1] if tree else []) + (large[1] if large else [])
    steps = [(r["tool"], k, st) for r in results_all for k, st in r["steps"].items()]
    steps += [("floor", f["what"], Step(**f["step"])) for f in floors]
    steps += [("floor", f"zstd -b{z['level']}", Step(**z["step"])) for z in zlevels]
    ncpu = os.cpu_count()
    busy = [(t, k, st.others_cpu_s / (st.wall_s * ncpu)) for t, k, st in steps
            if st.wall_s and st.others_cpu_s is not None and st.wall_s >= 0.5]
    worst = max(busy, key=lambda b: b[2], default=None)
    w(f"- niceness {os.nice(0)}; other processes' share of the {ncpu} cores during the timed "
      "steps (from /proc/stat): "
      + (f"at most {100 * worst[2]:.0f} % ({worst[0]} {worst[1]})" if worst else "n/a")
      + ("; **the machine was busy: compare CPU seconds, not wall times**"
         if worst and worst[2] > 0.10 else ""))
    w("- times: wall seconds and user+system CPU seconds; RSS: peak resident set; both from "
      "`/usr/bin/time -f '%e %M %U %S'`; repo: `du -sb`; backup RSS is the "
      "larger of the backups; every round's numbers in `bench/work/results"
      + ("-small" if args.small else "") + ".json`")
    peers = [t for t in tools if t.name not in VARIANTS]
    settings = [f"- {t.name} settings: {t.settings}" for t in peers if t.settings]
    peer_skips = [(n, why) for n, why in skipped if n not in VARIANTS]

    if tree is not None:
        ds, results = tree
        variants = [r for r in results if r["tool"] in VARIANTS]
        variant_skips = [(n, why) for n, why in skipped if n in VARIANTS]
        results = [r for r in results if r["tool"] not in VARIANTS]
        w("")
        w("## System tree\n")
        w(f"- dataset: {ds.describe()}")
        if ds.one:
            w(f"- one-file restore: `{ds.one}` ({ds.one_bytes / MiB:.2f} MiB, the regular file "
              "closest to 2 MiB) from the newest snapshot, through each tool's path filter: "
              "Backer and restic `restore --include ABSPATH`, rustic `restore latest:ABSPATH "
              "DEST`, Borg `borg extract ARCHIVE PATH`, Kopia `snapshot restore ID/PATH DEST`; "
              "checked by size and SHA-256, and that nothing else came back")
        w("- repo: after the unchanged re-run")
        w("")
        out.extend(results_table(results, peer_skips, TREE_COLS))
        out.extend(chart_lines(charts.get("tree"), args.out))
        out.extend(standing_lines(results, floors))
        notes = settings + result_notes(results)
        settings = []       # once is enough
        if notes:
            w("")
            w("Notes:\n")
            out.extend(notes)
        local = next((r for r in results if r["tool"] == "Backer"), None)
        for name in VARIANTS:
            if name in ON_S3:
                continue
            r = next((v for v in variants if v["tool"] == name), None)
            why = next((why for n, why in variant_skips if n == name), None)
            if r is not None or why is not None:
                w("")
                out.extend(variant_section(name, r, local, why))
        s3 = [r for r in variants if r["tool"] in ON_S3]
        s3_skips = [(n, why) for n, why in variant_skips if n in ON_S3]
        if s3 or s3_skips:
            w("")
            out.extend(object_storage_section(results + variants, s3_skips))

    if large is not None:
        ds, results = large
        results = [r for r in results if r["tool"] not in VARIANTS]
        w("")
        w("## One large file, then 1 % of it changed\n")
        w(f"- dataset: {ds.describe()}; generated by bench/run from the seed (the same "
          "bytes on every machine), cached in `bench/work`")
        w("- steps: first backup of version 1; unchanged re-run; re-run after changes: "
          "version 2 renamed to the same path (size, mtime and inode differ), backed up as "
          "the next snapshot; restore: the newest snapshot (version 2), checked by size and "
          "SHA-256; one-file restore: the same file through each tool's path filter (as for "
          "the tree); check --read-data of the repository holding both versions")
        w("- repo MiB: after the three backups; added by changes: what the re-run after "
          "changes added to it. The new bytes are ~2 % of the file (random: incompressible), "
          "but each edit makes the tool store again the whole chunk it falls in, so this "
          "grows with the average chunk size: Backer, restic and rustic 1 MiB, Borg 2 MiB, "
          "Kopia 4 MiB")
        w("- not run here: Backer-server and Backer-S3 (system tree only)")
        w("")
        out.extend(results_table(results, peer_skips, LARGE_COLS))
        out.extend(chart_lines(charts.get("large"), args.out))
        notes = settings
        if any(r["tool"] == "Kopia" for r in results):
            notes.append(f"- Kopia on this dataset: `--content-cache-size-limit-mb="
                         f"{KOPIA_LARGE_CACHE_MB}` at `repository create`: by default it keeps a "
                         "copy of every data blob it reads (up to 5 GB), which here would be "
                         "another copy of the file on the same disk")
        notes += result_notes(results)
        if notes:
            w("")
            w("Notes:\n")
            out.extend(notes)

    if not floors:
        return "\n".join(out) + "\n"
    w("")
    w("## Floor: the system tree's bytes as one tar stream, no chunking, dedup or encryption\n")
    w("| what | s | CPU s | MiB/s of tar stream | output MiB | of tar stream |")
    w("|---|---:|---:|---:|---:|---:|")
    for f in floors:
        st = f["step"]
        ok = st["ok"]
        secs = st["wall_s"] if ok else None
        mbps = tar_bytes / MiB / secs if secs and tar_bytes else None
        size = f["out_bytes"]
        what = f["what"].replace("|", "\\|")    # a bare | would split the cell
        w(f"| {what} | {fmt(secs)} | {fmt(st['cpu_s'] if ok else None)} | {fmt(mbps, 0)} | "
          f"{fmt(size / MiB if size else None, 1)} | "
          f"{(f'{100 * size / tar_bytes:.1f} %') if size and tar_bytes else '—'} |")
    w("")
    w("Floor commands: `tar -cf - -C bench/work DATASET | wc -c` (GNU tar does not read "
      "file contents when writing straight to /dev/null, hence the pipe), and "
      "`tar ... | zstd -N -T2 -q -c | wc -c` for N = " + ", ".join(map(str, ZSTD_LEVELS)) + ".")
    if zlevels:
        w("")
        w("## zstd per core, 1 MiB independent blocks (`zstd -bN -B1MiB -T1` on the dataset's tar)\n")
        w("| level | compress MB/s | decompress MB/s | output MiB | of tar stream |")
        w("|---|---:|---:|---:|---:|")
        for z in zlevels:
            if "out_bytes" not in z:
                w(f"| {z['level']} | failed: {z['step']['note']} | | | |")
                continue
            w(f"| {z['level']} | {z['comp_mb_s']:.0f} | {z['decomp_mb_s']:.0f} | "
              f"{z['out_bytes'] / MiB:.1f} | {100 * z['out_bytes'] / z['in_bytes']:.1f} % |")
        w("")
        w("MB/s here are zstd's (10^6 bytes/s of input, in memory, one core). Each block "
          "is compressed on its own, as a backup tool compresses each chunk.")
    return "\n".join(out) + "\n"


# The storage engine's targets against restic and the machine's floor
# (issue "Storage engine"): (what, column key, peer, at least this ratio).
ENGINE_TARGETS = [
    ("first backup at least 2.5× faster than restic", "first backup s", 2.5),
    ("unchanged re-run at least 2× faster than restic", "re-run s", 2.0),
    ("restore at least 2× faster than restic", "restore s", 2.0),
]


def standing_lines(results, floors):
    """Where Backer is ahead and behind on the system tree, and the engine's
    targets, computed from this run's figures."""
    backer = next((r for r in results if r["tool"] == "Backer"), None)
    if backer is None:
        return []
    ahead, behind = 0, []
    for r in results:
        if r["tool"] == "Backer":
            continue
        for c in TREE_COLS:
            b, p = c.get(backer), c.get(r)
            if b is None or p is None or b == 0:
                continue
            if p / b >= 1.0:
                ahead += 1
            else:
                behind.append(f"{r['tool']}'s {c.head} ({p:.3g} against Backer's {b:.3g}: {p / b:.2f}×)")
    out = ["", "### Where Backer stands (system tree, this run)", ""]
    out.append(f"- ahead in {ahead} of {ahead + len(behind)} comparisons with the peers"
               + (":" if behind else "; behind in none"))
    if behind:
        out.append("- behind: " + "; ".join(behind))
    restic = next((r for r in results if r["tool"] == "restic"), None)
    cols = {c.head: c for c in TREE_COLS}
    for what, head, need in ENGINE_TARGETS:
        b = cols[head].get(backer)
        p = cols[head].get(restic) if restic else None
        if b is None or p is None or b == 0:
            out.append(f"- target, {what}: not measured")
            continue
        got = p / b
        out.append(f"- target, {what}: {got:.2f}× — "
                   + ("met" if got >= need else "**not met** (why: see the floor target below)"))
    bsize, psize = (cols["repo MiB"].get(backer), cols["repo MiB"].get(restic) if restic else None)
    if bsize and psize:
        over = bsize / psize - 1
        out.append(f"- target, repository at most 5 % larger than restic's: {100 * over:+.1f} % — "
                   + ("met" if over <= 0.05 else "**not met**"))
    floor = next((f for f in floors if f["what"].startswith("zstd -2")), None)
    wall, cpu = sval(backer, "backup", "wall_s"), sval(backer, "backup", "cpu_s")
    if floor and wall:
        fw, fc = floor["step"]["wall_s"], floor["step"]["cpu_s"]
        got = wall / fw if fw else None
        if got is not None:
            line = (f"- target, first backup within 1.3× of the floor (`zstd -2 -T2` over the same "
                    f"bytes, {fw:.2f} s): {got:.2f}× — {'met' if got <= 1.3 else '**not met**'}")
            if got > 1.3 and cpu and fc:
                line += (f". Cause, from this run's CPU figures: Backer used {cpu:.2f} CPU s "
                         f"where zstd alone used {fc:.2f}, and the other {cpu - fc:.2f} s go to "
                         "reading the files, cutting chunks, hashing, sealing and writing packs")
            out.append(line)
    return out
