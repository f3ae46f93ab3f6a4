"""How each tool is set up and run: Tool (the same steps for every tool),
Backer (local mode, server, S3), restic, Borg, rustic, Kopia."""

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from .common import KOPIA_BIN, LOGS, PASSWORD, ROOT, RUSTIC_BIN, WORK, du_bytes, log, sh
from .datasets import KOPIA_LARGE_CACHE_MB, discard_tree
from .servers import S3Site, stop_proc, wait_for
from .timing import Step, timed


class Tool:
    """One backup program. Subclasses give the command lines; run() does the
    same sequence for every tool, so they are measured identically."""
    name = "?"
    # The settings it is measured with, in one line for RESULTS.md.
    settings = ""
    # Built by bench/install-peers in the background (its --wait argument).
    bg_build = None
    # The run dir (repository, restore dir, the tool's cache and config) of the
    # dataset being measured, and that dataset; run() sets them.
    base = None
    ds = None
    # Step labels (log file names): TOOL-STEP, TOOL-large-STEP.
    tag = "?"

    def missing(self):          # -> reason string, or None if usable
        return None

    def version(self):
        return ""

    def env(self):
        return {}

    def init(self, repo): ...
    def backup(self, repo, data): ...
    def restore(self, repo, target): ...
    def check(self, repo): ...

    def restore_one(self, repo, target, data, rel):
        """Restore only DATA/rel (a file) of the newest snapshot, somewhere
        under target (created, empty, before the step). None if the tool cannot
        (then no_one_file says why)."""
        return None

    no_one_file = "no way to restore a single file"

    def restore_cwd(self, target):
        """Working directory for the restore, or None. When set, the restore
        dir is created (empty) before the step."""
        return None

    def setup(self, base, repo):
        """The init step: by default the timed init command. Tools with
        long-running processes (a server, an S3 mock) start them here."""
        return timed(f"{self.tag}-init", self.init(repo), self.env())

    def stop(self):
        """Stop whatever setup() started; called however run() ends."""

    def watched(self):
        """{name: pid} of long-running processes each timed step should account."""
        return {}

    def repo_exists(self, repo):
        return repo.is_dir()

    def repo_label(self, repo):
        return repo.relative_to(ROOT)

    def repo_size(self, repo):
        return du_bytes(repo)

    def run(self, ds):
        res = {"tool": self.name, "version": self.version(), "steps": {}}
        self.ds = ds
        self.tag = self.name if ds.key == "tree" else f"{self.name}-{ds.key}"
        self.base = base = WORK / "runs" / self.tag
        repo, target = base / "repo", base / "restore"
        # Fresh repository, fresh restore dir, fresh tool cache every run.
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        try:
            self.run_steps(res, base, repo, target, ds)
        finally:
            self.stop()
            # Repositories take GBs (the large file's several GiB per tool) and
            # only the numbers are kept; a failed tree run's stays to look at.
            if ds.key != "tree" or all(st.ok for st in res["steps"].values()):
                shutil.rmtree(base, ignore_errors=True)
        return res

    def timed(self, step, argv, cwd=None):
        """One of this tool's steps (log label TAG-STEP), timed with its env
        and its long-running processes watched."""
        return timed(f"{self.tag}-{step}", argv, self.env(), cwd=cwd, watch=self.watched())

    def run_steps(self, res, base, repo, target, ds):
        steps = res["steps"]
        data = ds.path
        if ds.changes:
            ds.use("v1")
        steps["init"] = self.setup(base, repo)
        if not steps["init"].ok:
            return
        steps["backup"] = self.timed("backup", self.backup(repo, data))
        if not steps["backup"].ok:
            return
        steps["rerun"] = self.timed("rerun", self.backup(repo, data))
        subprocess.run(["sync"])
        if not self.repo_exists(repo):
            # An exit status of 0 is not enough: a stub that does nothing passes.
            steps["backup"].ok = False
            steps["backup"].note = f"exit 0 but no repository at {self.repo_label(repo)}"
            steps["rerun"].ok = False
            log(f"{self.name}: {steps['backup'].note}")
            return
        res["repo_bytes"] = self.repo_size(repo)
        if ds.changes:
            # Version 2 at the same path; the newest snapshot is now of it.
            ds.use("v2")
            steps["changed"] = self.timed("changed", self.backup(repo, data))
            ds.drop()       # restores are checked against its hash; frees the disk
            subprocess.run(["sync"])
            if steps["changed"].ok:
                res["repo_bytes_changed"] = self.repo_size(repo)
        for key, argv, check in (
                ("restore", lambda: self.restore(repo, target), ds.verify_restore),
                ("restore_one", lambda: self.restore_one(repo, target, data, ds.one),
                 ds.verify_one)):
            if key == "restore_one" and ds.one is None:
                res.setdefault("na", {})[key] = "no suitable file in the dataset"
                continue
            cmd = argv()
            if cmd is None:
                res.setdefault("na", {})[key] = self.no_one_file
                continue
            discard_tree(target)
            cwd = self.restore_cwd(target)
            if cwd is not None or key == "restore_one":
                target.mkdir(parents=True, exist_ok=True)
            steps[key] = self.timed(key.replace("_", "-"), cmd, cwd=cwd)
            if steps[key].ok:
                res[f"{key}_check"] = check(target)
                if not res[f"{key}_check"].startswith("ok"):
                    steps[key].ok = False
                    steps[key].note = res[f"{key}_check"]
                    log(f"{self.name} {key}: {res[f'{key}_check']}")
            # The restored copy can be as big as the dataset; not needed any more.
            discard_tree(target)
        steps["check"] = self.timed("check", self.check(repo))


class Backer(Tool):
    name = "Backer"
    settings = "its defaults (zstd level 2, all cores)"

    def __init__(self):
        b = Path(os.environ.get("BACKER_BIN", "target/release/backer"))
        self.bin = b if b.is_absolute() else ROOT / b

    def missing(self):
        if not os.access(self.bin, os.X_OK):
            return f"Backer is missing: no executable {self.bin} (cargo build --release, or set BACKER_BIN)"

    def version(self):
        try:
            return sh([str(self.bin), "--version"], stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    def env(self):
        # Own cache dir inside the run dir (used on S3 only): starts empty,
        # like the repository, as restic's does.
        env = {"BACKER_PASSWORD": PASSWORD}
        if self.base is not None:
            env["BACKER_CACHE_DIR"] = str(self.base / "cache")
        return env

    def init(self, repo):
        return [str(self.bin), "init", "--repo", str(repo)]

    def backup(self, repo, data):
        return [str(self.bin), "backup", "--repo", str(repo), str(data)]

    def restore(self, repo, target):
        return [str(self.bin), "restore", "--repo", str(repo), "latest", "--target", str(target)]

    def restore_one(self, repo, target, data, rel):
        return self.restore(repo, target) + ["--include", str(data / rel)]

    def check(self, repo):
        return [str(self.bin), "check", "--repo", str(repo), "--read-data"]


class BackerServer(Backer):
    """Backer's server path: the CLI asks backer-server for a job, backer-agent
    on the same machine reads (or writes) the files and talks to the server
    over mutual TLS on 127.0.0.1; the server writes the repository."""
    name = "Backer-server"
    settings = ("backer-agent → backer-server over mutual TLS on 127.0.0.1, both started "
                "by the harness; repository in the run dir; the server's defaults")
    CLIENT = "h1"

    def __init__(self):
        super().__init__()
        self.server_bin = self.bin.parent / "backer-server"
        self.agent_bin = self.bin.parent / "backer-agent"
        self.server = self.agent = None
        self.cli_env = {}
        self.state = None

    def missing(self):
        why = super().missing()
        if why:
            return why
        for b in (self.server_bin, self.agent_bin):
            if not os.access(b, os.X_OK):
                return f"no executable {b} (cargo build --release)"

    def env(self):
        return self.cli_env

    def repository(self, repo):
        """The server's repository location."""
        return repo

    def server_env(self):
        return {}

    def watched(self):
        return {n: p.pid for n, p in (("server", self.server), ("agent", self.agent))
                if p is not None}

    def setup(self, base, repo):
        # Untimed by GNU time (two processes stay running): only the wall time
        # from server start to agent connected is recorded.
        step = Step(load=round(os.getloadavg()[0], 2))
        t0 = time.monotonic()
        try:
            self.start(base, repo)
            step.ok = True
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
            step.note = f"set-up failed: {e}"
            log(f"{self.name} init: FAILED ({step.note})")
        step.wall_s = round(time.monotonic() - t0, 2)
        if step.ok:
            log(f"{self.name}-init: server and agent up, agent enrolled and connected "
                f"in {step.wall_s:.2f} s")
        return step

    def start(self, base, repo):
        conf, self.state = base / "conf", base / "state"
        (conf / "clients").mkdir(parents=True)
        (conf / "server.toml").write_text(f"""[server]
MgmtPort = 0
DataPort = 0
RestApiPort = 0
ExternalName = "localhost"
DataTransferInterface = "127.0.0.1"
[repository]
Localization = "{self.repository(repo)}"
[clients]
ConfigFile = "clients/"
""")
        (conf / "clients" / "clients.toml").write_text("\n")
        out, slog = base / "server.out", LOGS / f"{self.name}-server.log"
        quiet = {**os.environ, **self.server_env(), "BACKER_LOG": "warn"}
        with open(out, "wb") as o, open(slog, "wb") as e:
            self.server = subprocess.Popen(
                [str(self.server_bin), "--config", str(conf / "server.toml"),
                 "--state-dir", str(self.state)], stdout=o, stderr=e, env=quiet)

        def listening():
            m = re.search(r"listening mgmt=\S+:(\d+)", out.read_text(errors="replace"))
            return m and m.group(1)
        mgmt = wait_for("backer-server start", listening, self.server, 30, slog)
        setup_log = LOGS / f"{self.name}-init.log"
        admin = base / "admin"
        with open(setup_log, "wb") as lg:
            def run(argv, env=None):
                lg.write(f"$ {shlex.join(argv)}\n".encode())
                lg.flush()
                subprocess.run(argv, stdout=lg, stderr=subprocess.STDOUT, check=True,
                               env={**os.environ, **(env or {})})
            run([str(self.server_bin), "--state-dir", str(self.state), "admin-cert",
                 "--name", "ops", "--out", str(admin)])
            # The server's certificate names localhost (ExternalName), not 127.0.0.1.
            self.cli_env = {"BACKER_SERVER": f"localhost:{mgmt}",
                            "BACKER_CA": str(admin / "ca.pem"),
                            "BACKER_CERT": str(admin / "admin.pem"),
                            "BACKER_KEY": str(admin / "admin-key.pem")}
            bundle = base / f"{self.CLIENT}.json"
            run([str(self.bin), "clients", "add", self.CLIENT, "--bundle-out", str(bundle)],
                self.cli_env)
            run([str(self.agent_bin), "--state-dir", str(base / "agent"), "enroll",
                 "--bundle", str(bundle)])
        alog = LOGS / f"{self.name}-agent.log"
        with open(alog, "wb") as e:
            self.agent = subprocess.Popen(
                [str(self.agent_bin), "--state-dir", str(base / "agent"), "run"],
                stdout=e, stderr=subprocess.STDOUT, env=quiet)

        def connected():
            r = subprocess.run([str(self.bin), "clients", "--json"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, **self.cli_env})
            try:
                return r.returncode == 0 and any(
                    c.get("name") == self.CLIENT and c.get("connected")
                    for c in json.loads(r.stdout))
            except ValueError:
                return False
        wait_for("backer-agent connect", connected, self.agent, 30, alog)

    def stop(self):
        stop_proc(self.agent)
        stop_proc(self.server)
        self.agent = self.server = None

    def backup(self, repo, data):
        return [str(self.bin), "backup", self.CLIENT, str(data), "--wait", "-q"]

    def restore(self, repo, target):
        # The agent restores each path under TARGET + its absolute path:
        # TARGET/<dataset path>/..., which verify_restore looks for first.
        return [str(self.bin), "restore", "latest", "--client", self.CLIENT,
                "--target", str(target), "--wait", "-q"]

    def restore_one(self, repo, target, data, rel):
        return self.restore(repo, target) + ["--include", str(data / rel)]

    def check(self, repo):
        # Locally, on the server's repository directory (what local mode's check
        # does), with the password the server generated for it.
        return ["env", "-u", "BACKER_SERVER", str(self.bin), "check", "--repo", str(repo),
                "--password-file", str(self.state / "repository-password"), "--read-data"]


class OnS3:
    """Mixin: a tool whose repository is on an S3Site started for its run;
    each timed step records the requests it made (Step.requests)."""
    delay_ms = 0

    def site_init(self, proxy_bin):
        self.site = S3Site(self.delay_ms, proxy_bin)

    def missing(self):
        return super().missing() or self.site.missing()

    def env(self):
        return {**super().env(), **S3Site.CREDS}

    def watched(self):
        return {**super().watched(), **self.site.pids()}

    def setup(self, base, repo):
        try:
            self.site.start(base, self.tag)
        except (OSError, RuntimeError) as e:
            step = Step(note=f"S3 set-up failed: {e}")
            log(f"{self.name} init: FAILED ({step.note})")
            return step
        return super().setup(base, repo)

    def stop(self):
        super().stop()
        self.site.stop()

    def timed(self, step, argv, cwd=None):
        self.site.reset()
        st = super().timed(step, argv, cwd)
        st.requests = self.site.requests()
        st.objects = len(self.site.objects())
        return st

    def repo_exists(self, repo):
        return bool(self.site.objects())

    def repo_label(self, repo):
        return f"s3://{S3Site.BUCKET}/{S3Site.PREFIX}"

    def repo_size(self, repo):
        return sum(self.site.objects())


class BackerS3(OnS3, Backer):
    """Backer local mode with the repository on S3 (s3s-fs, no added delay)."""
    name = "Backer-S3"
    settings = ("local mode, its defaults; repository on s3s-fs (a real S3 server storing "
                "objects as files) started by the harness on 127.0.0.1, behind the counting proxy")

    def __init__(self):
        super().__init__()
        self.site_init(self.bin.parent / "s3-latency-proxy")

    @property
    def url(self):
        return (f"s3://{S3Site.BUCKET}/{S3Site.PREFIX}?endpoint={self.site.endpoint}"
                "&path_style=true")

    def init(self, repo):
        return super().init(self.url)

    def backup(self, repo, data):
        return super().backup(self.url, data)

    def restore(self, repo, target):
        return super().restore(self.url, target)

    def restore_one(self, repo, target, data, rel):
        return super().restore_one(self.url, target, data, rel)

    def check(self, repo):
        return super().check(self.url)


class BackerS3Slow(BackerS3):
    name = "Backer-S3-20ms"
    delay_ms = 20
    settings = "as Backer-S3, with 20 ms added to every request by the proxy"


class Restic(Tool):
    # Debian's restic (0.14 on bookworm). Repository format v2 (its default
    # since 0.14) with the default compression "auto" (zstd, fastest level).
    name = "restic"
    settings = "repository v2, compression auto (zstd), all cores"

    def missing(self):
        if not shutil.which("restic"):
            return "restic not installed (bench/install-peers)"

    def version(self):
        return sh(["restic", "version"]).split(" compiled")[0]

    def env(self):
        # Own cache dir inside the run dir: starts empty, like the repo.
        return {"RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(self.base / "cache")}

    def init(self, repo):
        return ["restic", "-r", str(repo), "init"]

    def backup(self, repo, data):
        return ["restic", "-r", str(repo), "backup", str(data)]

    def restore(self, repo, target):
        return ["restic", "-r", str(repo), "restore", "latest", "--target", str(target)]

    def restore_one(self, repo, target, data, rel):
        # --include takes a pattern; pick_one_file only picks plain paths.
        return self.restore(repo, target) + ["--include", str(data / rel)]

    def check(self, repo):
        return ["restic", "-r", str(repo), "check", "--read-data"]


class ResticS3Slow(OnS3, Restic):
    """restic on the same S3 server and proxy as Backer-S3-20ms."""
    name = "restic-S3-20ms"
    delay_ms = 20
    settings = "as restic, repository on s3s-fs behind the proxy adding 20 ms per request"

    def __init__(self):
        super().__init__()
        self.site_init(Backer().bin.parent / "s3-latency-proxy")

    def url(self):
        return f"s3:{self.site.endpoint}/{S3Site.BUCKET}/{S3Site.PREFIX}"

    def init(self, repo):
        return super().init(self.url())

    def backup(self, repo, data):
        return super().backup(self.url(), data)

    def restore(self, repo, target):
        return super().restore(self.url(), target)

    def restore_one(self, repo, target, data, rel):
        return super().restore(self.url(), target) + ["--include", str(data / rel)]

    def check(self, repo):
        return super().check(self.url())


class Rustic(Tool):
    # rustic from crates.io, built by bench/install-peers into the cache.
    # Its defaults: compression zstd level 3, local cache.
    name = "rustic"
    settings = "its defaults (zstd level 3, all cores); built without default features"
    bg_build = "rustic"

    def missing(self):
        if not os.access(RUSTIC_BIN, os.X_OK):
            return f"rustic not installed yet ({RUSTIC_BIN}; bench/install-peers)"

    def version(self):
        return sh([str(RUSTIC_BIN), "--version"]).strip()

    def env(self):
        return {}

    def common(self, repo):
        # --no-progress: progress bars on a pipe only make the logs noisy.
        # --use-profile "": do not pick up a user's ~/.config/rustic/rustic.toml.
        return [str(RUSTIC_BIN), "--use-profile", "", "--no-progress",
                "-r", str(repo), "--password", PASSWORD,
                "--cache-dir", str(self.base / "cache")]

    def init(self, repo):
        return self.common(repo) + ["init"]

    def backup(self, repo, data):
        return self.common(repo) + ["backup", str(data)]

    def restore(self, repo, target):
        return self.common(repo) + ["restore", "latest", str(target)]

    def restore_one(self, repo, target, data, rel):
        # SNAPSHOT:PATH; a file is written to the destination path itself.
        return self.common(repo) + ["restore", f"latest:{data / rel}",
                                    str(target / Path(rel).name)]

    def check(self, repo):
        return self.common(repo) + ["check", "--read-data"]


class Borg(Tool):
    # Debian's borgbackup (1.2 on bookworm). See bench/run's docstring.
    name = "Borg"
    settings = ("repokey-blake2, `--compression zstd,3`, default chunker; "
                "single-threaded (Borg 1.x); check column: `borg check --verify-data`")

    def __init__(self):
        self.archives = 0

    def missing(self):
        if not shutil.which("borg"):
            return "borg not installed (bench/install-peers)"

    def version(self):
        return sh(["borg", "--version"]).strip()

    def env(self):
        # BORG_BASE_DIR: ~/.config/borg (keys, security dir) and ~/.cache/borg
        # (chunks and files cache) go to the run dir: fresh each run, like the
        # repo, and nothing in $HOME.
        return {"BORG_PASSPHRASE": PASSWORD,
                "BORG_BASE_DIR": str(self.base / "home"),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no"}

    def init(self, repo):
        self.archives = 0
        return ["borg", "init", "--encryption=repokey-blake2", str(repo)]

    def archive(self, repo):
        return f"{repo}::bench-{self.archives}"

    def backup(self, repo, data):
        # Each call is a new archive (Borg refuses an existing name).
        self.archives += 1
        return ["borg", "create", "--compression", "zstd,3", self.archive(repo), str(data)]

    def restore(self, repo, target):
        # The newest archive: the re-run's. Borg 1.x has no "latest".
        return ["borg", "extract", self.archive(repo)]

    def restore_one(self, repo, target, data, rel):
        # A path argument selects what to extract; archived without the "/".
        return self.restore(repo, target) + [str(data / rel).lstrip("/")]

    def restore_cwd(self, target):
        # borg extract writes relative to its working directory.
        return target

    def check(self, repo):
        return ["borg", "check", "--verify-data", str(repo)]


class Kopia(Tool):
    # kopia built from the Go module proxy by bench/install-peers. See
    # bench/run's docstring.
    name = "Kopia"
    settings = ("its defaults (filesystem repository, DYNAMIC-4M-BUZHASH, BLAKE2B-256-128, "
                "AES256-GCM-HMAC-SHA256, all cores) except compression: Kopia's default is "
                "none; set to `zstd` with `kopia policy set --global --compression=zstd`; "
                "check column: `kopia snapshot verify --verify-files-percent=100`")
    bg_build = "kopia"

    def missing(self):
        if not os.access(KOPIA_BIN, os.X_OK):
            return f"kopia not installed yet ({KOPIA_BIN}; bench/install-peers)"

    def version(self):
        return "kopia " + sh([str(KOPIA_BIN), "--version"]).split()[0]

    def env(self):
        run = self.base
        # The config file (and the password file Kopia keeps beside it), the
        # cache and the logs all go to the run dir, never to $HOME.
        return {"KOPIA_PASSWORD": PASSWORD,
                "KOPIA_CONFIG_PATH": str(run / "kopia.config"),
                "KOPIA_CACHE_DIRECTORY": str(run / "cache"),
                "KOPIA_LOG_DIR": str(run / "logs"),
                "KOPIA_CHECK_FOR_UPDATES": "false"}

    def kopia(self, *args):
        return [str(KOPIA_BIN), "--config-file", self.env()["KOPIA_CONFIG_PATH"], *args]

    def init(self, repo):
        # Two commands in one step: the repository, then its global policy.
        create = self.kopia("repository", "create", "filesystem", "--path", str(repo),
                            "--cache-directory", self.env()["KOPIA_CACHE_DIRECTORY"],
                            "--no-check-for-updates")
        if self.ds is not None and self.ds.key == "large":
            create.append(f"--content-cache-size-limit-mb={KOPIA_LARGE_CACHE_MB}")
        policy = self.kopia("policy", "set", "--global", "--compression=zstd")
        return ["sh", "-c", f"{shlex.join(create)} && {shlex.join(policy)}"]

    def backup(self, repo, data):
        return self.kopia("snapshot", "create", "--no-progress", str(data))

    def newest(self):
        """The newest snapshot's id (an untimed look-up)."""
        snaps = json.loads(sh(self.kopia("snapshot", "list", "--all", "--json"),
                              env={**os.environ, **self.env()}))
        return max(snaps, key=lambda m: m["startTime"])["id"]

    def restore(self, repo, target):
        return self.kopia("snapshot", "restore", "--no-progress", self.newest(), str(target))

    def restore_one(self, repo, target, data, rel):
        # ID/PATH (relative to the snapshot's root, the dataset dir); the
        # target is the file to write, in an existing directory.
        return self.kopia("snapshot", "restore", "--no-progress", f"{self.newest()}/{rel}",
                          str(target / Path(rel).name))

    def check(self, repo):
        return self.kopia("snapshot", "verify", "--verify-files-percent=100")


class BackerServerS3(OnS3, BackerServer):
    """The server path with the server's repository on S3 (s3s-fs, no added
    delay): what a Kubernetes restore from object storage takes."""
    name = "Backer-server-S3"
    settings = "as Backer-server, the server's repository on s3s-fs behind the counting proxy"

    def __init__(self):
        super().__init__()
        self.site_init(self.bin.parent / "s3-latency-proxy")

    def repository(self, repo):
        return (f"s3://{S3Site.BUCKET}/{S3Site.PREFIX}?endpoint={self.site.endpoint}"
                "&path_style=true")

    def server_env(self):
        return S3Site.CREDS

    def check(self, repo):
        return super().check(self.repository(repo))
