//! Human output: sizes, durations, and progress bars that only draw on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::Global;

/// Writes a line to standard output, returning the error instead of
/// panicking as `println!` does: output into a closed pipe
/// (`backer snapshots | head -1`) then ends the command through `main`,
/// which ends quietly ([`closed_pipe`]). SIGPIPE stays ignored, as Rust
/// sets it: the network clients write to sockets with calls that would
/// otherwise raise it when a peer hangs up.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub fn write_out(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    std::io::stdout().lock().write_fmt(args)
}

/// Whether `e` comes from writing into a closed pipe.
pub fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                .is_some_and(|k| k == std::io::ErrorKind::BrokenPipe)
    })
}

pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else if secs >= 10.0 {
        format!("{}:{:02}", s / 60, s % 60)
    } else {
        format!("{secs:.2}s")
    }
}

/// A byte progress bar on stderr, or a hidden one when stderr is not a
/// terminal, or with --quiet or --json.
pub fn bar(g: &Global, prefix: &str) -> ProgressBar {
    if g.quiet || g.json {
        return ProgressBar::hidden();
    }
    terminal_bar(prefix)
}

/// A byte progress bar on stderr when it is a terminal; the one style of
/// every command's bar, the kubectl plugin's too.
pub fn terminal_bar(prefix: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
    pb.set_style(style(BYTES));
    pb.set_prefix(prefix.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

const BYTES: &str =
    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}";

fn count_template(unit: &str) -> String {
    format!("{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ETA {{eta}} {{msg}}")
}

/// The same bar counting `unit`s instead of bytes (check's packs).
pub fn count_style(unit: &str) -> ProgressStyle {
    style(&count_template(unit))
}

fn style(template: &str) -> ProgressStyle {
    // Both templates are checked by the test below.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bar_template_is_valid() {
        for t in [BYTES.to_string(), count_template("packs")] {
            assert!(ProgressStyle::with_template(&t).is_ok(), "{t}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.50 KiB");
        assert_eq!(size(3 * 1024 * 1024 * 1024), "3.00 GiB");
        assert_eq!(duration(1.234), "1.23s");
        assert_eq!(duration(75.0), "1:15");
        assert_eq!(duration(3725.0), "1:02:05");
    }
}
