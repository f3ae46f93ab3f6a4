"""The charts: bench-chart's JSON input (ratios to restic) and calling the
chart crate (bench/chart) to draw the PNG."""

import json
import os
import subprocess
from pathlib import Path

from .common import ROOT, WORK, log
from .report import VARIANTS
from .tools import Backer


def chart_input(title, cols, results):
    """bench-chart's input: per measure, restic's figure over each other tool's
    (higher is better; restic is the line at 1). None without a restic row."""
    restic = next((r for r in results if r["tool"] == "restic"), None)
    if restic is None:
        return None
    measures = [c for c in cols if c.chart]
    base = [c.get(restic) for c in measures]
    tools = [{"name": r["tool"],
              "ratios": [round(b / v, 3) if b is not None and v else None
                         for b, v in zip(base, (c.get(r) for c in measures))]}
             for r in results if r["tool"] != "restic"]
    if not tools:
        return None
    return {"title": title, "measures": [c.chart for c in measures], "tools": tools}


def chart_bin():
    """The bench-chart binary, or None."""
    env = os.environ.get("BENCH_CHART")
    if env:
        return Path(env) if os.access(env, os.X_OK) else None
    cands = [Backer().bin.parent / "bench-chart"]
    if os.environ.get("CARGO_TARGET_DIR"):
        t = Path(os.environ["CARGO_TARGET_DIR"])
        cands += [t / "release" / "bench-chart", t / "debug" / "bench-chart"]
    cands += [ROOT / "target" / "release" / "bench-chart", ROOT / "target" / "debug" / "bench-chart"]
    return next((c for c in cands if os.access(c, os.X_OK)), None)


def draw_chart(key, title, cols, results, md_out, small):
    """Write the chart's JSON and PNG; returns {"png": path or None, "why": ...}."""
    suffix = ("" if key == "tree" else f"-{key}") + ("-small" if small else "")
    spec = chart_input(title, cols, [r for r in results if r["tool"] not in VARIANTS])
    if spec is None:
        why = "no chart: it needs restic and at least one other tool in the run"
        log(why)
        return {"png": None, "why": why}
    js = WORK / f"chart{suffix}.json"
    js.write_text(json.dumps(spec, indent=1))
    png = Path(md_out).resolve().parent / f"chart{suffix}.png"
    exe = chart_bin()
    if exe is None:
        why = ("no chart: bench-chart is not built (`cargo build --release -p "
               f"backer-bench-chart`, or set BENCH_CHART); its input is in {js.relative_to(ROOT)}")
        log(why)
        return {"png": None, "why": why}
    p = subprocess.run([str(exe), str(js), str(png)], text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        why = f"no chart: {exe} failed: {p.stdout.strip().splitlines()[-1:] or p.returncode}"
        log(why)
        return {"png": None, "why": why}
    log(f"chart: {png} (drawn by {exe}, from {js})")
    return {"png": str(png), "why": None}
