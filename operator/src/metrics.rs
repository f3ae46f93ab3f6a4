//! Counters for `/metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: Mutex<BTreeMap<&'static str, u64>>,
    failures: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub runs_started: AtomicU64,
    pub runs_failed: AtomicU64,
    pub certificates_signed: AtomicU64,
    pub certificates_denied: AtomicU64,
    pub leader: AtomicU64,
}

impl Metrics {
    pub fn reconciled(&self, controller: &'static str) {
        *self.reconciles.lock().entry(controller).or_default() += 1;
    }

    pub fn failed(&self, controller: &'static str, category: &'static str) {
        *self.failures.lock().entry((controller, category)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE backer_operator_reconciles_total counter\n");
        for (c, n) in self.reconciles.lock().iter() {
            out.push_str(&format!(
                "backer_operator_reconciles_total{{controller=\"{c}\"}} {n}\n"
            ));
        }
        out.push_str("# TYPE backer_operator_reconcile_errors_total counter\n");
        for ((c, cat), n) in self.failures.lock().iter() {
            out.push_str(&format!(
                "backer_operator_reconcile_errors_total{{controller=\"{c}\",category=\"{cat}\"}} {n}\n"
            ));
        }
        for (name, v) in [
            ("backer_operator_runs_started_total", &self.runs_started),
            ("backer_operator_runs_failed_total", &self.runs_failed),
            (
                "backer_operator_certificates_signed_total",
                &self.certificates_signed,
            ),
            (
                "backer_operator_certificates_denied_total",
                &self.certificates_denied,
            ),
        ] {
            out.push_str(&format!(
                "# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# TYPE backer_operator_leader gauge\nbacker_operator_leader {}\n",
            self.leader.load(Ordering::Relaxed)
        ));
        out
    }
}
