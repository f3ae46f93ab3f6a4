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
    /// Issue an admin certificate for the `backer` CLI (run on the server host)
    AdminCert {
        /// Administrator's name, recorded in the certificate
        #[arg(long)]
        name: String,
        /// Directory to write admin.pem, admin-key.pem and ca.pem into
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
}

fn main() -> ExitCode {
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
        Some(Command::AdminCert { name, out, days }) => {
            admin_cert(&cli.state_dir, cli.pki_dir, &name, &out, days)
        }
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
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
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
    let state = StateDir::new(state_dir)?.with_pki(pki_dir);
    let ca = state.ca()?;
    let issued = ca.issue_admin(name, days)?;
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let key = issued.key_pem.unwrap_or_default();
    backer_server::state::write_atomic(&out.join("admin-key.pem"), key.as_bytes(), true)?;
    backer_server::state::write_atomic(&out.join("admin.pem"), issued.cert_pem.as_bytes(), false)?;
    backer_server::state::write_atomic(&out.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
    println!(
        "wrote {}/admin.pem, admin-key.pem and ca.pem (valid {days} days)",
        out.display()
    );
    Ok(())
}
