//! The process's metrics registry: one Prometheus recorder per process, with explicit
//! histogram buckets, shared by the router and any workers running in the process.
//! Every metric is described where it is defined (`router::metrics`,
//! `tandem_worker_runtime::metrics`), so each has `# HELP` and `# TYPE` lines.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, seconds: 1 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Inter-token latency buckets: decode steps take milliseconds to tens of milliseconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 1.0,
];

/// Token-count buckets (predicted cached tokens, prediction errors): 0 means exact.
pub const TOKEN_BUCKETS: &[f64] = &[0.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 32768.0];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle).
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            // A full-name matcher wins over a suffix matcher.
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(crate::metrics::ITL.into()), ITL_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(Matcher::Full(crate::metrics::PREDICTED_CACHED.into()), TOKEN_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(Matcher::Full(crate::metrics::PREDICTION_ERROR.into()), TOKEN_BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())
                .inspect(|h| {
                    // Histogram samples are folded into buckets only on a scrape or an upkeep:
                    // without this, a process nobody scrapes would keep every sample.
                    let h = h.clone();
                    let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        h.run_upkeep();
                    });
                })
        })
        .clone()
}

/// How often the recorder folds pending histogram samples when nobody scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The installed recorder's handle, if `install` ran.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().and_then(|h| h.as_ref().ok().cloned())
}
