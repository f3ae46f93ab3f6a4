"""The one timed(): a command under GNU time, with the machine's idle share
from /proc/stat, our background peer build paused, and long-running helper
processes (a server, an agent) accounted."""

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .common import BUILD_PID, LOGS, ROOT, log, tail


@dataclass
class Step:
    wall_s: float = None
    rss_mb: float = None
    cpu_s: float = None     # user + system seconds of the step (all threads, children)
    others_cpu_s: float = None  # CPU the rest of the machine used meanwhile (see busy_jiffies)
    ok: bool = False
    load: float = None      # 1-min load average just before the step
    note: str = ""
    # Long-running processes the step used (backer-server, backer-agent, s3s-fs):
    # name -> {"cpu_s": CPU s they used during the step, "rss_mb": their peak RSS
    # (VmHWM), "peak": "step" if VmHWM was reset before the step, else "lifetime"}.
    daemons: dict = None
    # On S3: requests the step made (counted by the proxy), and how many
    # objects the repository held after it.
    requests: int = None
    objects: int = None


HZ = os.sysconf("SC_CLK_TCK")


def busy_jiffies():
    """Busy CPU time of the whole machine so far (all cores), from /proc/stat.
    The difference across a step, minus the step's own CPU time, is what other
    processes used meanwhile: on a shared machine that tells whether a wall time
    is trustworthy (the load average lags by a minute)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


class BgBuild:
    """The kopia/rustic build that bench/install-peers may have left running. It is
    paused (SIGSTOP to its process group) while anything is timed, so it cannot
    steal a core from the tool being measured, and resumed right after."""

    def __init__(self):
        self.pgid = None
        try:
            pid = int(BUILD_PID.read_text())
            os.kill(pid, 0)
            self.pgid = pid        # started with setsid: pid == pgid
        except (OSError, ValueError):
            pass

    def running(self):
        if self.pgid is None:
            return False
        try:
            os.kill(self.pgid, 0)
            return True
        except OSError:
            self.pgid = None
            return False

    def pause(self):
        if self.running():
            os.killpg(self.pgid, signal.SIGSTOP)

    def resume(self):
        if self.running():
            os.killpg(self.pgid, signal.SIGCONT)


# Set by bench/run (harness.run) and bench/slow-create: our background peer
# build (a BgBuild), and --wait-idle's seconds.
BG = None
WAIT_IDLE = 0


def wait_idle(max_wait):
    """On a shared machine, hold the next timed step until the other processes
    use less than 0.2 cores (sampled over 2 s), for at most max_wait seconds.
    Whatever still ran during the step is recorded in others_cpu_s anyway.
    Our own background peer build is paused only while sampling, so it keeps
    using the spare CPU while we wait; it stays paused once we go ahead."""
    BG.pause()
    if max_wait <= 0:
        return
    t0, said = time.monotonic(), False
    while True:
        j0 = busy_jiffies()
        time.sleep(2)
        cores = (busy_jiffies() - j0) / HZ / 2
        if cores < 0.2:
            return
        if time.monotonic() - t0 > max_wait:
            log(f"still busy ({cores:.1f} cores used by others) after {max_wait} s; measuring anyway")
            return
        if not said:
            log(f"machine busy ({cores:.1f} cores used by others); waiting up to {max_wait} s")
            said = True
        BG.resume()
        time.sleep(15)
        BG.pause()


def proc_cpu_s(pid):
    """utime + stime of a process so far, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / HZ    # fields 14 and 15 of stat(5)


def proc_hwm_mb(pid):
    """Peak RSS (VmHWM) of a live process, MiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None


def reset_hwm(pid):
    """Reset a process's VmHWM to its current RSS (proc(5): clear_refs, "5")."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(label, argv, env=None, cwd=None, watch=None, settle=True, quiet=False):
    """Run argv under GNU time; return a Step. Output goes to bench/work/logs/
    (LABEL.log: the command's stdout and stderr; LABEL.time: GNU time's).
    env: variables added to ours. cwd: the command's working directory.
    watch: {name: pid} of long-running processes that do the step's work
    (a server, an agent); their CPU time and peak RSS over the step go to
    Step.daemons, and their CPU is not counted as the other processes'.
    settle: first `sync`, wait for the machine to go quiet (wait_idle) and
    pause our background peer build for the step, as bench/run's steps do;
    False runs the command at once (bench/many-files, bench/prune-history).
    quiet: no log line for the step (the caller reports it)."""
    if settle:
        # Flush earlier writes (previous tool's repository, restore) so their
        # writeback is not charged to this step.
        subprocess.run(["sync"])
    LOGS.mkdir(parents=True, exist_ok=True)
    logf, timef = LOGS / f"{label}.log", LOGS / f"{label}.time"
    watch = watch or {}
    try:
        if settle:
            wait_idle(WAIT_IDLE)    # returns with the background build paused
        step = Step(load=round(os.getloadavg()[0], 2))
        reset = {n: reset_hwm(p) for n, p in watch.items()}
        d0 = {n: proc_cpu_s(p) for n, p in watch.items()}
        j0 = busy_jiffies()
        with open(logf, "wb") as out:
            rc = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(timef), *argv],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd).returncode
    finally:
        j1 = busy_jiffies()
        d1 = {n: proc_cpu_s(p) for n, p in watch.items()}
        if settle:
            BG.resume()
    # With a failing command GNU time writes "Command exited..." first; the
    # numbers are always on the last line.
    last = timef.read_text().strip().splitlines()[-1].split()
    step.wall_s, step.rss_mb = float(last[0]), round(int(last[1]) / 1024, 1)
    step.cpu_s = round(float(last[2]) + float(last[3]), 2)
    daemons_cpu = 0.0
    if watch:
        step.daemons = {}
        for n, p in watch.items():
            cpu = (round(d1[n] - d0[n], 2)
                   if d0[n] is not None and d1[n] is not None else None)
            daemons_cpu += cpu or 0.0
            step.daemons[n] = {"cpu_s": cpu, "rss_mb": proc_hwm_mb(p),
                               "peak": "step" if reset[n] else "lifetime"}
    step.others_cpu_s = round(max(0.0, (j1 - j0) / HZ - step.cpu_s - daemons_cpu), 2)
    step.ok = rc == 0
    if not step.ok:
        step.note = f"exit {rc}, see {logf.relative_to(ROOT)}"
        if not quiet:
            log(f"{label}: FAILED ({step.note}); last lines:")
            print(tail(logf), file=sys.stderr)
    elif not quiet:
        log(f"{label}: {step.wall_s:.2f} s wall, {step.cpu_s:.2f} s CPU, "
            f"{step.rss_mb:.0f} MB peak RSS (others used {step.others_cpu_s:.1f} CPU s meanwhile)"
            + "".join(f"; {n}: {d['cpu_s']} s CPU, {d['rss_mb']} MB peak RSS"
                      for n, d in (step.daemons or {}).items()))
    return step


def timed_or_exit(prog, label, argv, env=None):
    """(wall s, peak RSS MiB) of argv, timed at once and quietly (bench/many-files,
    bench/prune-history); if it fails, the program (prog) exits with the end of
    the command's output."""
    step = timed(label, argv, env, settle=False, quiet=True)
    if not step.ok:
        sys.exit(f"{prog}: {shlex.join(argv)} failed ({step.note}):\n{tail(LOGS / f'{label}.log')}")
    return step.wall_s, step.rss_mb
