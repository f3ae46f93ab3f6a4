//! backer-server: `backer-server --config /etc/backer/server.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use backer_server::server::{self, Options};
use backer_server::state::StateDir;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "backer-server",
    version,
    about = "Backer's server: owns the repository and the CA, enrols clients, runs their jobs over mutual TLS",
    after_help = "Configuration: server.toml ([server], [repository], [clients]) and the clients directory's \
                  clients.toml, backups.toml and schedules.toml. SIGHUP reloads it."
)]
struct Cli {
    /// The server configuration file
    #[arg(
        short,
        long,
        env = "BACKER_SERVER_CONFIG",
        default_value = "/etc/backer/server.toml"
    )]
    config: PathBuf,
    /// Where the CA, the server's certificate and the client registry live
    #[arg(long, env = "BACKER_STATE_DIR", default_value = "/var/lib/backer")]
    state_dir: PathBuf,
    /// Read the CA and the server certificate from this directory (ca.pem,
    /// ca-key.pem, server.pem, server-key.pem) instead of the state
    /// directory: in Kubernetes, the operator's backer-pki Secret
    #[arg(long, env = "BACKER_PKI_DIR")]
    pki_dir: Option<PathBuf>,
    /// Run the schedule clock from this time (RFC 3339) instead of now: lets a
    /// test see a schedule fire without waiting for it. Not for production.
    #[arg(long, hide = true, value_parser = parse_time)]
    clock_start: Option<chrono::DateTime<chrono::Utc>>,
    /// DEVELOPMENT ONLY: serve management and data without TLS. Agents are then
    /// identified by the name they claim; anyone reaching the ports can act as
    /// any client. Logged loudly at start and every ten minutes.
    #[arg(long)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Issue an admin certificate for the `backer` CLI, or revoke or list
    /// them (run on the server host; a running server sees the change at
    /// the next call)
    AdminCert {
        /// Administrator's name, recorded in the certificate and in the
        /// server's record of admin certificates
        #[arg(long, required_unless_present_any = ["revoke", "list"])]
        name: Option<String>,
        /// Directory to write admin.pem, admin-key.pem and ca.pem into
        #[arg(long, required_unless_present_any = ["revoke", "list"])]
        out: Option<PathBuf>,
        /// Lifetime in days
        #[arg(long, default_value_t = 90)]
        days: i64,
        /// Revoke every certificate issued to this admin instead
        #[arg(long, value_name = "NAME", conflicts_with_all = ["name", "out", "list"])]
        revoke: Option<String>,
        /// List the admin certificates issued, revoked or not, instead
        #[arg(long, conflicts_with_all = ["name", "out"])]
        list: bool,
    },
}

fn main() -> ExitCode {
    backer_repo::memory::limit_arenas();
    // One crypto provider for every TLS connection in the process.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(Command::AdminCert {
            revoke: Some(name), ..
        }) => revoke_admin_certs(&cli.state_dir, &name),
        Some(Command::AdminCert { list: true, .. }) => list_admin_certs(&cli.state_dir),
        Some(Command::AdminCert {
            name: Some(name),
            out: Some(out),
            days,
            ..
        }) => admin_cert(&cli.state_dir, cli.pki_dir, &name, &out, days),
        Some(Command::AdminCert { .. }) => Err(anyhow::anyhow!(
            "admin-cert needs --name and --out (or --revoke NAME, or --list)"
        )),
        None => serve(Options {
            config: cli.config,
            state_dir: cli.state_dir,
            pki_dir: cli.pki_dir,
            clock_start: cli.clock_start,
            insecure_plaintext: cli.insecure_plaintext,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-01-31T01:59:50Z: {e}"))
}

fn serve(opts: Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        let shutdown = backer_proto::terminated();
        server::run(opts, shutdown, |bound| {
            // One line a test or a supervisor can wait for.
            println!(
                "listening mgmt={} data={} rest={}",
                bound.mgmt, bound.data, bound.rest
            );
        })
        .await
        .map_err(anyhow::Error::from)
    })
}

fn admin_cert(
    state_dir: &std::path::Path,
    pki_dir: Option<PathBuf>,
    name: &str,
    out: &std::path::Path,
    days: i64,
) -> anyhow::Result<()> {
    if !backer_server::config::valid_client_name(name) {
        anyhow::bail!(
            "{name:?} is not a valid admin name: use a DNS name (lower-case letters, digits, '-' and '.')"
        );
    }
    if name == backer_server::server::OPERATOR_ADMIN {
        anyhow::bail!("{name} is the operator's own identity; choose another name");
    }
    let state = StateDir::new(state_dir)?.with_pki(pki_dir);
    let ca = state.ca()?;
    let issued = ca.issue_admin(name, days)?;
    // Recorded before it is handed out: the server refuses what it has no record of.
    let now = chrono::Utc::now().timestamp();
    state
        .update_admin_certs(now, |a| a.record(name, &issued.serial, issued.not_after, now))
        .context("failed to record the admin certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let key = issued.key_pem.unwrap_or_default();
    backer_server::state::write_atomic(&out.join("admin-key.pem"), key.as_bytes(), true)?;
    backer_server::state::write_atomic(&out.join("admin.pem"), issued.cert_pem.as_bytes(), false)?;
    backer_server::state::write_atomic(&out.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
    println!(
        "wrote {}/admin.pem, admin-key.pem and ca.pem (valid {days} days, serial {})",
        out.display(),
        hex::encode(&issued.serial)
    );
    Ok(())
}

fn revoke_admin_certs(state_dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let state = StateDir::new(state_dir)?;
    let now = chrono::Utc::now().timestamp();
    let (known, revoked) = state
        .update_admin_certs(now, |a| {
            (a.certs.iter().any(|c| c.name == name), a.revoke(name, now))
        })
        .context("failed to revoke")?;
    if !known {
        anyhow::bail!("no admin certificate of {name} is recorded (`admin-cert --list` lists them)");
    }
    println!(
        "revoked {revoked} admin certificate(s) of {name}; a running server refuses them from their next call"
    );
    Ok(())
}

fn list_admin_certs(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let state = StateDir::new(state_dir)?;
    let when = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default()
    };
    println!(
        "{:<24} {:<34} {:<17} {:<17} revoked",
        "admin", "serial", "issued", "expires"
    );
    for c in state.load_admin_certs()?.certs {
        println!(
            "{:<24} {:<34} {:<17} {:<17} {}",
            c.name,
            c.serial,
            when(c.issued),
            when(c.not_after),
            c.revoked.map_or("-".to_string(), when)
        );
    }
    Ok(())
}
