"""Long-running processes the harness starts for a tool's run: s3s-fs behind
s3-latency-proxy (S3Site), and how to wait for and stop them. (backer-server
and backer-agent are started by tools.BackerServer.start.)"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from .common import LOGS, ROOT


def wait_for(what, cond, proc, timeout, logf=None):
    """Poll cond() every 0.1 s until it returns something true; fail if proc
    exits or timeout seconds pass."""
    t0 = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            last = Path(logf).read_text(errors="replace").strip().splitlines()[-1:] if logf else []
            raise RuntimeError(f"{what}: process exited with {proc.returncode}"
                               + (f" ({last[0].strip()})" if last else "")
                               + (f"; see {Path(logf).relative_to(ROOT)}" if logf else ""))
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not after {timeout} s")
        time.sleep(0.1)


def stop_proc(proc):
    """Stop one process we started: SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class S3Site:
    """A real S3 server for the bench: s3s-fs (crates.io; objects are files
    under its root) with the workspace's s3-latency-proxy in front, which
    adds a fixed delay to every request (a network round trip) and counts
    them. Everything on 127.0.0.1; the clients get explicit credentials."""
    BUCKET, PREFIX = "bench", "repo"
    CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
             "AWS_REGION": "us-east-1"}

    def __init__(self, delay_ms, proxy_bin):
        self.delay_ms = delay_ms
        self.proxy_bin = proxy_bin
        self.server = self.proxy = None
        self.root = None
        self.port = None
        # Never through an HTTP proxy of the environment: all on 127.0.0.1.
        self.http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def server_bin(self):
        # s3s-fs's S3 implementation, served by the workspace's testkit
        # (see testkit/src/bin/s3s_fs_server.rs), beside the proxy.
        return Path(self.proxy_bin).parent / "s3s-fs-server"

    def missing(self):
        for b in (self.server_bin(), self.proxy_bin):
            if not os.access(b, os.X_OK):
                return f"no executable {b} (cargo build --release -p backer-testkit)"

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, base, tag):
        self.root = base / "s3"
        (self.root / self.BUCKET).mkdir(parents=True)
        ports = []
        for _ in range(2):
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                ports.append(sk.getsockname()[1])
        s3_port, self.port = ports
        slog, plog = LOGS / f"{tag}-s3s-fs.log", LOGS / f"{tag}-proxy.log"
        with open(slog, "wb") as e:
            self.server = subprocess.Popen(
                [str(self.server_bin()), "--host", "127.0.0.1", "--port", str(s3_port),
                 "--access-key", self.CREDS["AWS_ACCESS_KEY_ID"],
                 "--secret-key", self.CREDS["AWS_SECRET_ACCESS_KEY"], str(self.root)],
                stdout=e, stderr=subprocess.STDOUT)
        with open(plog, "wb") as e:
            self.proxy = subprocess.Popen(
                [str(self.proxy_bin), "--upstream", f"http://127.0.0.1:{s3_port}",
                 "--delay-ms", str(self.delay_ms), "--listen", f"127.0.0.1:{self.port}"],
                stdout=e, stderr=subprocess.STDOUT)

        def listening(port):
            def up():
                with socket.socket() as sk:
                    return sk.connect_ex(("127.0.0.1", port)) == 0
            return up
        wait_for("s3s-fs start", listening(s3_port), self.server, 30, slog)
        wait_for("s3-latency-proxy start", listening(self.port), self.proxy, 30, plog)

    def stop(self):
        stop_proc(self.proxy)
        stop_proc(self.server)
        self.proxy = self.server = None

    def pids(self):
        return {n: p.pid for n, p in (("s3s-fs", self.server), ("proxy", self.proxy))
                if p is not None}

    def reset(self):
        self.http.open(urllib.request.Request(f"{self.endpoint}/__proxy/reset", data=b"",
                                              method="POST"), timeout=10).close()

    def requests(self):
        with self.http.open(f"{self.endpoint}/__proxy/stats", timeout=10) as r:
            return json.loads(r.read()).get("requests", 0)

    def objects(self):
        """Sizes of the objects under bucket/prefix (files under the root)."""
        top = self.root / self.BUCKET / self.PREFIX
        return [f.stat().st_size for f in top.rglob("*") if f.is_file()] if top.is_dir() else []
