//! `backer`: the command line, for local repositories and a backer-server;
//! installed as `kubectl-backer`, the kubectl plugin (`kubectl.rs`).

#[macro_use]
mod output;
mod kubectl;
mod local;
mod remote;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit code for work that finished but skipped or refused some entries.
pub const EXIT_INCOMPLETE: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "backer",
    version,
    about = "Fast, deduplicated, encrypted backups",
    long_about = "Fast, deduplicated, encrypted backups.\n\n\
        A repository is a directory, a file:// URL or an s3://BUCKET/PREFIX URL \
        (options as ?endpoint=URL&region=R&path_style=true; credentials from AWS_* variables).\n\
        The password comes from BACKER_PASSWORD, --password-file, or a prompt on a terminal.",
    after_help = "Examples (a local repository):\n  backer init --repo /srv/backup\n  backer backup --repo /srv/backup /home --exclude '*.cache'\n  backer snapshots --repo /srv/backup\n  backer restore --repo /srv/backup latest --target /tmp/r --include /home/me/notes.txt\n\n\
                  Examples (through a backer-server; BACKER_SERVER, BACKER_CA, BACKER_CERT, BACKER_KEY set):\n  backer clients add web1 --bundle-out web1.json\n  backer backup web1 /etc /home --wait\n  backer snapshots web1\n  backer restore latest --client web1 --target /tmp/r --wait"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    server: remote::ServerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Repository location: a path, file://PATH or s3://BUCKET/PREFIX
    #[arg(short = 'r', long, env = "BACKER_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the password from this file (first line)
    #[arg(long, env = "BACKER_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress display and only essential output
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Wait this long for a conflicting lock (e.g. a running prune) to go, instead of failing
    #[arg(long, value_name = "DURATION", global = true, value_parser = parse_wait)]
    pub retry_lock: Option<std::time::Duration>,
    /// Read without taking a lock (restore, check, ls, snapshots, stats), for read-only or
    /// full storage; a prune running meanwhile may make the command fail
    #[arg(long, global = true)]
    pub no_lock: bool,
    /// Keep copies of what is re-read from an S3 repository (index, snapshots, trees) here
    /// [default: $XDG_CACHE_HOME/backer, else ~/.cache/backer]
    #[arg(long, value_name = "DIR", env = "BACKER_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Read everything from the repository, keeping no local copies (check and repair never use
    /// them)
    #[arg(long, global = true)]
    pub no_cache: bool,
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    backer_repo::retention::parse_duration(s)
        .map(std::time::Duration::from_secs)
        .map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository
    Init,
    /// Back up files and directories into a new snapshot
    Backup(local::BackupArgs),
    /// List snapshots
    Snapshots(local::SnapshotsArgs),
    /// List files in a snapshot
    Ls(local::LsArgs),
    /// Restore a snapshot, or chosen paths of it, into a directory
    Restore(local::RestoreArgs),
    /// Verify the repository's structure, and with --read-data every byte
    Check(local::CheckArgs),
    /// Show what the repository holds and what dedup and compression save
    Stats,
    /// Remove snapshots by a retention policy (or by id), optionally pruning after
    Forget(local::ForgetArgs),
    /// Remove data no snapshot uses and repack mostly-empty packs
    Prune(local::PruneArgs),
    /// Remove stale locks left by processes that died (or, with --remove-all, every lock)
    Unlock(local::UnlockArgs),
    /// Manage the passwords that open the repository
    #[command(subcommand)]
    Key(local::KeyCommand),
    /// Mend a damaged repository: rebuild the index from the packs, drop or rewrite damaged snapshots
    #[command(subcommand)]
    Repair(local::RepairCommand),
    /// Clients of a backer-server: list, add (prints an enrolment token), reenroll, remove
    Clients {
        #[command(subcommand)]
        command: Option<remote::ClientsCommand>,
    },
    /// Certificates of a backer-server and its clients
    #[command(subcommand)]
    Cert(remote::CertCommand),
    /// Jobs of a backer-server (backups and restores), newest last
    Jobs(remote::JobsArgs),
}

/// As `kubectl-backer`: the plugin's own commands.
fn kubectl_main() -> ExitCode {
    let cli = kubectl::KubectlCli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(kubectl::run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away: nothing is wrong.
        Err(e) if output::closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors quote names and hosts: escaped, like all text output.
            eprintln!("error: {}", backer_repo::text::escape(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Whether a command that works on a repository and through a server alike
/// goes to the server: `--repo` on the command line means the repository,
/// `--server` the server; when both are only set in the environment the
/// choice is the user's to make, not ours to guess.
fn through_server(
    matches: &clap::ArgMatches,
    g: &Global,
    server: &remote::ServerArgs,
) -> anyhow::Result<bool> {
    use clap::parser::ValueSource;
    let given = |id: &str| {
        let mut m = Some(matches);
        while let Some(cur) = m {
            if cur.value_source(id) == Some(ValueSource::CommandLine) {
                return true;
            }
            m = cur.subcommand().map(|(_, sub)| sub);
        }
        false
    };
    match (given("repo"), given("server")) {
        (true, true) => {
            anyhow::bail!("give either --repo (a repository) or --server (a backer-server), not both")
        }
        (true, false) => Ok(false),
        (false, true) => Ok(true),
        (false, false) => match (&g.repo, &server.server) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both BACKER_REPO and BACKER_SERVER are set: pass --repo or --server to say which is meant, \
                 or unset one"
            ),
            (_, s) => Ok(s.is_some()),
        },
    }
}

/// What an interrupted command leaves behind, said on the way out.
fn interrupted_note(command: &Command, remote: bool) -> &'static str {
    match command {
        _ if remote => "the job goes on on the server (`backer jobs` shows it)",
        Command::Backup(_) => {
            "no snapshot was saved; what it had stored already is reused by the next backup or removed by `backer prune`"
        }
        Command::Restore(_) => {
            "the restore is incomplete: files in the target may be partly written; restore again with --overwrite"
        }
        Command::Prune(_) => "the repository is as consistent as before; run prune again to finish",
        _ => "nothing more was written",
    }
}

/// SIGINT and SIGTERM, caught from before the command starts, so that no
/// signal meets the default action (which would end the process with its
/// lock left in the repository).
struct Interrupts(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Interrupts {
    /// Must be called inside the runtime.
    fn catch() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self(
            signal(SignalKind::interrupt())
                .ok()
                .zip(signal(SignalKind::terminate()).ok()),
        )
    }

    /// The exit code for the first signal (130 or 143); never, where the
    /// signals could not be caught.
    async fn next(&mut self) -> u8 {
        match &mut self.0 {
            Some((int, term)) => tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            },
            None => std::future::pending().await,
        }
    }
}

/// After a signal: removes the repository locks this process holds and says
/// what was left, so an interrupted command never leaves the repository
/// locked until its lock goes stale.
async fn say_interrupted(note: &'static str) {
    let released = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        backer_repo::lock::release_held(),
    )
    .await;
    let lock = match released {
        Ok(0) => String::new(),
        Ok(_) => "; the repository lock is released".into(),
        Err(_) => {
            "; the repository lock could not be removed in time (`backer unlock` removes it once stale)"
                .into()
        }
    };
    // Interrupted at the password prompt, echo is off: turn it back on.
    terminal::close();
    // One raw write, not eprintln!: a command blocked writing its log into
    // a full pipe holds stderr's lock, and waiting for it would keep the
    // process alive.
    let _ = rustix::io::write(
        std::io::stderr(),
        format!("\ninterrupted: {note}{lock}\n").as_bytes(),
    );
}

/// Ends an interrupted process at once, running no exit handlers.
///
/// Its other threads may still be reading, hashing or encrypting (or
/// waiting at the password prompt): `exit(3)` would run the C libraries'
/// exit-time destructors (aws-lc's among them) under them, and once in CI a
/// process died of a signal there after saying it was interrupted. What must
/// outlive the process is done by now: the locks removed, the note said.
#[allow(unsafe_code)]
fn exit_at_once(code: u8) -> ! {
    // stdout is not flushed, for the same reason the note is written raw:
    // at most a part of a line is lost.
    // SAFETY: `_exit` takes a plain integer and never returns; skipping
    // exit handlers and destructors is what it is called for here.
    unsafe { libc::_exit(i32::from(code)) }
}

fn main() -> ExitCode {
    backer_repo::memory::limit_arenas();
    // One crypto provider for every TLS connection in the process.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if kubectl::invoked_as_plugin() {
        return kubectl_main();
    }
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let filter = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut g = cli.global;
    // A check or repair must see storage as it is, not a copy of it.
    if matches!(cli.command, Command::Check(_) | Command::Repair(_)) {
        g.no_cache = true;
    }
    let server = cli.server;
    let remote = match &cli.command {
        Command::Backup(_) | Command::Snapshots(_) | Command::Ls(_) | Command::Restore(_) => {
            through_server(&matches, &g, &server)
        }
        _ => Ok(false),
    };
    let through = remote.as_ref().is_ok_and(|r| *r);
    let mut interrupts = {
        let _in_runtime = runtime.enter();
        Interrupts::catch()
    };
    let note = interrupted_note(&cli.command, through);
    // The command runs as a task, so that this thread stays free to act on a
    // signal even while the command blocks (at the password prompt, say).
    let mut command = runtime.spawn(async move {
        let remote = remote?;
        match cli.command {
            Command::Init => local::init(&g).await,
            // With a server named, these act through it instead of on a repository.
            Command::Backup(a) if remote => remote::backup(&g, &server, a).await,
            Command::Snapshots(a) if remote => remote::snapshots(&g, &server, a).await,
            Command::Ls(a) if remote => remote::ls(&g, &server, a).await,
            Command::Restore(a) if remote => remote::restore(&g, &server, a).await,
            Command::Backup(a) => local::backup(&g, a).await,
            Command::Snapshots(a) => local::snapshots(&g, a).await,
            Command::Ls(a) => local::ls(&g, a).await,
            Command::Restore(a) => local::restore(&g, a).await,
            Command::Check(a) => local::check(&g, a).await,
            Command::Stats => local::stats(&g).await,
            Command::Forget(a) => local::forget(&g, a).await,
            Command::Prune(a) => local::prune(&g, a).await,
            Command::Unlock(a) => local::unlock(&g, a).await,
            Command::Key(k) => local::key(&g, k).await,
            Command::Repair(c) => local::repair(&g, c).await,
            Command::Clients { command } => remote::clients(&g, &server, command).await,
            Command::Cert(c) => remote::cert(&g, &server, c).await,
            Command::Jobs(a) => remote::jobs(&g, &server, a).await,
        }
    });
    let result = match runtime.block_on(async {
        tokio::select! {
            biased;
            code = interrupts.next() => Err(code),
            done = &mut command => Ok(done),
        }
    }) {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => match e.try_into_panic() {
            // The panic was reported as it happened; end as a panic would.
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(anyhow::anyhow!("the command was cancelled: {e}")),
        },
        Err(code) => {
            // The command is left running, not aborted: dropping its lock
            // would forget the lock without removing it. Releasing the lock
            // stops its writers instead (they check the lock before writing).
            runtime.block_on(say_interrupted(note));
            exit_at_once(code);
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        // The reader of our output went away: nothing is wrong.
        Err(e) if output::closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors quote names and hosts: escaped, like all text output.
            eprintln!("error: {}", backer_repo::text::escape(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
