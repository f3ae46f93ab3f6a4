//! What `/metrics` shows, kept with prometheus-client and served in the
//! OpenMetrics text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What `render` returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Controller {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failure {
    controller: &'static str,
    category: &'static str,
}

fn reconcile_histogram() -> Histogram {
    // 1 ms to about 33 s: a reconcile is a few API calls, or a server call.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Controller, Counter>,
    failures: Family<Failure, Counter>,
    durations: Family<Controller, Histogram, fn() -> Histogram>,
    pub runs_started: Counter,
    pub runs_failed: Counter,
    pub certificates_signed: Counter,
    pub certificates_denied: Counter,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backer_operator");
        let reconciles = Family::<Controller, Counter>::default();
        let failures = Family::<Failure, Counter>::default();
        let durations =
            Family::<Controller, Histogram, fn() -> Histogram>::new_with_constructor(reconcile_histogram);
        let m = Metrics {
            runs_started: Counter::default(),
            runs_failed: Counter::default(),
            certificates_signed: Counter::default(),
            certificates_denied: Counter::default(),
            leader: Gauge::default(),
            reconciles: reconciles.clone(),
            failures: failures.clone(),
            durations: durations.clone(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles done, by controller", reconciles);
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error category",
            failures,
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took, by controller",
            durations,
        );
        registry.register("runs_started", "BackupJob runs started", m.runs_started.clone());
        registry.register(
            "runs_failed",
            "BackupJob runs that ended failed",
            m.runs_failed.clone(),
        );
        registry.register(
            "certificates_signed",
            "Agent certificate requests approved and signed",
            m.certificates_signed.clone(),
        );
        registry.register(
            "certificates_denied",
            "Agent certificate requests denied",
            m.certificates_denied.clone(),
        );
        registry.register("leader", "1 while this replica holds the lease", m.leader.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A reconcile of `controller` ended after `took`.
    pub fn reconciled(&self, controller: &'static str, took: Duration) {
        let c = Controller { controller };
        self.reconciles.get_or_create(&c).inc();
        self.durations.get_or_create(&c).observe(took.as_secs_f64());
    }

    pub fn failed(&self, controller: &'static str, category: &'static str) {
        self.failures
            .get_or_create(&Failure { controller, category })
            .inc();
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
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
    fn counters_gauges_and_durations_render_under_their_names() {
        let m = Metrics::default();
        m.certificates_signed.inc();
        m.leader.set(1);
        m.reconciled("backupjob", Duration::from_millis(3));
        m.failed("backupjob", "kube");
        let text = m.render();
        for line in [
            "backer_operator_certificates_signed_total 1",
            "backer_operator_certificates_denied_total 0",
            "backer_operator_leader 1",
            "backer_operator_reconciles_total{controller=\"backupjob\"} 1",
            "backer_operator_reconcile_errors_total{controller=\"backupjob\",category=\"kube\"} 1",
            "backer_operator_reconcile_duration_seconds_count{controller=\"backupjob\"} 1",
            "backer_operator_reconcile_duration_seconds_bucket{le=\"0.004\",controller=\"backupjob\"} 1",
            "backer_operator_reconcile_duration_seconds_bucket{le=\"0.002\",controller=\"backupjob\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }
}
