//! What `/metrics` shows, kept with prometheus-client and served in the
//! OpenMetrics text format: clients, agents, certificates and the job
//! record as they are at each scrape ([`Observed`], gathered by the REST
//! adapter), and how long jobs took, observed as each one ends.

use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::jobs::{JobState, Kind};

/// What [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: &'static str,
    state: &'static str,
}

const KINDS: [Kind; 2] = [Kind::Backup, Kind::Restore];
const STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Partial,
    JobState::Failed,
];

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Backup => "backup",
        Kind::Restore => "restore",
    }
}

fn duration_histogram() -> Histogram {
    // 1 s to 3 days (2^18 s): from a one-file restore to a first backup of
    // a large volume over a slow link.
    Histogram::new(exponential_buckets(1.0, 2.0, 19))
}

/// The server's state at one scrape.
#[derive(Debug, Default)]
pub struct Observed {
    pub pending: i64,
    pub enrolled: i64,
    pub revoked: i64,
    pub connected: i64,
    pub server_not_after: i64,
    pub soonest_client_expiry: Option<i64>,
    /// Jobs in the record, by kind and state.
    pub jobs: Vec<(Kind, JobState)>,
    /// File content read by the recorded backups, and of it what was new.
    pub backup_bytes: u64,
    pub backup_new_bytes: u64,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    clients: Family<ClientLabels, Gauge>,
    connected: Gauge,
    expiry: Family<CertLabels, Gauge>,
    jobs: Family<JobLabels, Gauge>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    backup_bytes: Gauge,
    backup_new_bytes: Gauge,
    dedup_ratio: Gauge<f64, AtomicU64>,
    /// One scrape at a time: its gauges are set, then written out.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backer");
        let m = Metrics {
            registry: Registry::default(),
            clients: Family::default(),
            connected: Gauge::default(),
            expiry: Family::default(),
            jobs: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            backup_bytes: Gauge::default(),
            backup_new_bytes: Gauge::default(),
            dedup_ratio: Gauge::default(),
            scraping: Mutex::new(()),
        };
        registry.register(
            "clients",
            "Clients known to the server, by enrolment state",
            m.clients.clone(),
        );
        registry.register(
            "agents_connected",
            "Agents with an open work connection",
            m.connected.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When a certificate expires (Unix time): the server's, and the soonest of the clients'",
            m.expiry.clone(),
        );
        registry.register(
            "jobs",
            "Jobs in the server's record, by kind and state",
            m.jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "How long jobs took, from start to end, observed as each ended since the server started",
            m.durations.clone(),
        );
        registry.register(
            "backup_bytes",
            "Bytes of file content read by recorded backups",
            m.backup_bytes.clone(),
        );
        registry.register(
            "backup_new_bytes",
            "Of those, bytes new to the repository (before compression)",
            m.backup_new_bytes.clone(),
        );
        registry.register(
            "dedup_ratio",
            "Bytes read per new byte stored, over recorded backups (0 until one stored something)",
            m.dedup_ratio.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A job of `kind` ended after `secs`.
    pub fn job_ended(&self, kind: Kind, secs: f64) {
        self.durations
            .get_or_create(&KindLabels {
                kind: kind_label(kind),
            })
            .observe(secs);
    }

    /// The OpenMetrics text for the state `o`.
    pub fn render(&self, o: &Observed) -> String {
        let _one = self.scraping.lock();
        for (state, n) in [
            ("pending", o.pending),
            ("enrolled", o.enrolled),
            ("revoked", o.revoked),
        ] {
            self.clients.get_or_create(&ClientLabels { state }).set(n);
        }
        self.connected.set(o.connected);
        self.expiry
            .get_or_create(&CertLabels { kind: "server" })
            .set(o.server_not_after);
        match o.soonest_client_expiry {
            Some(t) => {
                self.expiry
                    .get_or_create(&CertLabels {
                        kind: "client_soonest",
                    })
                    .set(t);
            }
            None => {
                self.expiry.remove(&CertLabels {
                    kind: "client_soonest",
                });
            }
        }
        // Every kind and state, 0 when none: a series that disappears
        // reads as "no data", not as "no such job".
        for kind in KINDS {
            for state in STATES {
                let n = o.jobs.iter().filter(|(k, s)| *k == kind && *s == state).count();
                self.jobs
                    .get_or_create(&JobLabels {
                        kind: kind_label(kind),
                        state: state.as_str(),
                    })
                    .set(n as i64);
            }
        }
        self.backup_bytes.set(o.backup_bytes as i64);
        self.backup_new_bytes.set(o.backup_new_bytes as i64);
        self.dedup_ratio.set(if o.backup_new_bytes > 0 {
            o.backup_bytes as f64 / o.backup_new_bytes as f64
        } else {
            0.0
        });
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_and_ended_jobs_render_under_their_names() {
        let m = Metrics::default();
        m.job_ended(Kind::Backup, 3.0);
        let text = m.render(&Observed {
            enrolled: 2,
            connected: 1,
            server_not_after: 2_000_000_000,
            jobs: vec![
                (Kind::Backup, JobState::Succeeded),
                (Kind::Backup, JobState::Succeeded),
            ],
            backup_bytes: 300,
            backup_new_bytes: 100,
            ..Default::default()
        });
        for line in [
            "backer_clients{state=\"enrolled\"} 2",
            "backer_clients{state=\"revoked\"} 0",
            "backer_agents_connected 1",
            "backer_certificate_expiry_timestamp_seconds{kind=\"server\"} 2000000000",
            "backer_jobs{kind=\"backup\",state=\"succeeded\"} 2",
            "backer_jobs{kind=\"restore\",state=\"failed\"} 0",
            "backer_job_duration_seconds_count{kind=\"backup\"} 1",
            "backer_job_duration_seconds_bucket{le=\"2.0\",kind=\"backup\"} 0",
            "backer_job_duration_seconds_bucket{le=\"4.0\",kind=\"backup\"} 1",
            "backer_dedup_ratio 3.0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("client_soonest"), "{text}");
    }
}
