//! The process's logs: one `tracing` subscriber, installed by `main` before any command
//! runs, writes the events of every crate (the router's membership changes, the workers'
//! registration, etcd's failures in `tandem-cluster`) to stderr. Stdout stays the
//! commands' own: `tandem: ready`, the addresses, `generate --json`, which scripts parse.
//!
//! - `--log-format text` (the default): `TIME LEVEL target: message field=value ...`, a
//!   line for a person; colours only when stderr is a terminal.
//! - `--log-format json`: one object per line (`timestamp`, `level`, `message`, the
//!   event's fields, `target`), for log pipelines.
//!
//! Which events are written: `RUST_LOG`'s directives when it is set (per crate, as
//! `info,tandem_cluster=debug`), else `--log-level` for every crate.
//!
//! Libraries that log through the `log` crate rather than `tracing` (rustls's TLS
//! handshake failures, for one) reach the same subscriber: their records become events
//! with the library's module path as the target.

use std::io::IsTerminal;

use anyhow::{anyhow, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How a log line is written.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Time, level, target, message, then the fields as `key=value`.
    Text,
    /// One JSON object per line.
    Json,
}

/// The flags of every command that say what is logged and how.
#[derive(Args, Debug, Clone)]
pub struct LogFlags {
    /// The least severe events logged. RUST_LOG, when set, wins over this flag and can choose
    /// per crate (e.g. RUST_LOG=info,tandem_cluster=debug).
    #[arg(long, global = true, env = "TANDEM_LOG_LEVEL", default_value = "info", value_parser = level())]
    pub log_level: LevelFilter,
    /// How logs are written to stderr: `text` (time, level, message, fields: for people) or
    /// `json` (one object per line: for log pipelines).
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-level`: the levels by name.
fn level() -> impl TypedValueParser<Value = LevelFilter> {
    PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"])
        .map(|s| s.parse().expect("one of the possible values"))
}

impl LogFlags {
    /// Makes stderr the destination of every `tracing` event of the process.
    pub fn install(&self) -> Result<()> {
        bridge_log_crate();
        let filter = filter(self.log_level, std::env::var("RUST_LOG").ok().as_deref())?;
        let subscriber = subscriber(self.log_format, filter, std::io::stderr().is_terminal(), std::io::stderr);
        tracing::subscriber::set_global_default(subscriber).map_err(|e| anyhow!("installing the log subscriber: {e}"))
    }
}

/// Turns the `log` crate's records into `tracing` events (once per process).
fn bridge_log_crate() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Fails only if another `log` logger is installed: then that one keeps them.
    ONCE.call_once(|| drop(tracing_log::LogTracer::init()));
}

/// `rust_log`'s directives when it has any (a malformed one is an error, not silence), else
/// `level` for every crate.
fn filter(level: LevelFilter, rust_log: Option<&str>) -> Result<EnvFilter> {
    match rust_log.map(str::trim).filter(|d| !d.is_empty()) {
        Some(directives) => EnvFilter::builder().parse(directives).map_err(|e| anyhow!("RUST_LOG={directives:?}: {e}")),
        None => Ok(EnvFilter::builder().parse(level.to_string()).expect("a level is a directive")),
    }
}

/// The subscriber writing `format` lines to `writer`; `ansi`: colours (text only).
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        // The event's fields beside `message` at the top level; no spans (none are used).
        LogFormat::Json => Box::new(
            builder.with_ansi(false).json().flatten_event(true).with_current_span(false).with_span_list(false).finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn rust_log_wins_over_the_level_and_a_malformed_one_is_an_error() {
        let table: [(LevelFilter, Option<&str>, LevelFilter); 7] = [
            (LevelFilter::INFO, None, LevelFilter::INFO),
            (LevelFilter::DEBUG, None, LevelFilter::DEBUG),
            (LevelFilter::OFF, None, LevelFilter::OFF),
            (LevelFilter::INFO, Some(""), LevelFilter::INFO),
            (LevelFilter::INFO, Some("  "), LevelFilter::INFO),
            (LevelFilter::INFO, Some("warn"), LevelFilter::WARN),
            (LevelFilter::ERROR, Some("error,tandem_cluster=debug"), LevelFilter::DEBUG),
        ];
        for (level, rust_log, want) in table {
            let f = filter(level, rust_log).unwrap();
            assert_eq!(f.max_level_hint(), Some(want), "--log-level {level} with RUST_LOG {rust_log:?}");
        }
        let err = filter(LevelFilter::INFO, Some("tandem_router=loud")).unwrap_err().to_string();
        assert!(err.starts_with("RUST_LOG=\"tandem_router=loud\""), "{err}");
    }

    #[test]
    fn the_flags_are_global_and_checked() {
        crate::Cli::command().debug_assert();
        let cli = crate::Cli::try_parse_from(["tandem", "router", "--log-level", "debug", "--log-format", "json"])
            .expect("the flags follow any command");
        assert_eq!((cli.log.log_level, cli.log.log_format), (LevelFilter::DEBUG, LogFormat::Json));
        let cli = crate::Cli::try_parse_from([
            "tandem",
            "--log-format",
            "text",
            "--log-level",
            "off",
            "generate",
            "--prompt",
            "hi",
        ])
        .expect("and precede it");
        assert_eq!((cli.log.log_level, cli.log.log_format), (LevelFilter::OFF, LogFormat::Text));
        for bad in [["--log-level", "loud"], ["--log-format", "xml"]] {
            assert!(crate::Cli::try_parse_from(["tandem", bad[0], bad[1], "router"]).is_err(), "{bad:?}");
        }
    }

    /// What `format` writes for a warning like the etcd registration's, and an info line
    /// a `warn` filter drops.
    fn written(format: LogFormat) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let s = subscriber(format, filter(LevelFilter::WARN, None).unwrap(), false, writer);
        tracing::subscriber::with_default(s, || {
            tracing::info!(worker = %"prefill-0", "not written");
            tracing::warn!(worker = %"prefill-0", lease = 42, "lease keep-alive failed; retrying with backoff");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn records_of_log_crate_libraries_are_written_too() {
        bridge_log_crate();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let s = subscriber(LogFormat::Text, filter(LevelFilter::INFO, None).unwrap(), false, writer);
        tracing::subscriber::with_default(s, || {
            log::warn!(target: "rustls::conn", "a TLS alert from the peer");
            log::debug!(target: "rustls::conn", "below the level: not written");
        });
        let out = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let [line] = out.lines().collect::<Vec<_>>()[..] else { panic!("one line: {out:?}") };
        assert!(line.contains("WARN") && line.contains("rustls::conn") && line.contains("a TLS alert"), "{line}");
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_is_time_level_target_message_fields() {
        let out = written(LogFormat::Text);
        let [line] = out.lines().collect::<Vec<_>>()[..] else { panic!("one line: {out:?}") };
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.len() > 20 && time.contains('T') && time.ends_with('Z'), "an RFC 3339 UTC time: {line}");
        assert_eq!(
            rest.trim_start(),
            "WARN tandem::logging::tests: lease keep-alive failed; retrying with backoff worker=prefill-0 lease=42"
        );
        assert!(!line.contains('\x1b'), "no colours off a terminal: {line:?}");
    }

    #[test]
    fn json_is_one_object_per_line() {
        let out = written(LogFormat::Json);
        let [line] = out.lines().collect::<Vec<_>>()[..] else { panic!("one line: {out:?}") };
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["level"], "WARN", "{line}");
        assert_eq!(v["message"], "lease keep-alive failed; retrying with backoff", "{line}");
        assert_eq!((&v["worker"], &v["lease"]), (&serde_json::json!("prefill-0"), &serde_json::json!(42)), "{line}");
        assert_eq!(v["target"], "tandem::logging::tests", "{line}");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
}
