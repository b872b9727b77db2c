//! SLO-aware admission: refuse at once a request whose first token would come after its
//! TTFT objective, rather than admit it to miss.
//!
//! The prediction ([`predict`]) is the prompt tokens queued ahead of the request on the
//! worker that computes it, plus its own uncached tokens, at the measured prefill rate
//! (`placement::PlacementControl::prefill_rate`), plus what the last requests' first
//! tokens took beyond that prediction (an average of the residual: KV transfer, the wait
//! for KV room when every decode worker is full, relaying). Tokens "ahead" count only
//! requests of the same or a more urgent `priority` (a lower value), so under load a less
//! urgent request's prediction is never the smaller: it is refused first.
//!
//! [`decide`] is the rule, a pure function; [`TtftModel`] holds the residual and records
//! how far predictions were off (`tandem_ttft_prediction_error_seconds`).

use std::sync::Mutex;
use std::time::Duration;

/// Which requests the rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SloAdmission {
    /// Never refuse for a predicted miss.
    Off,
    /// Requests that carry their own objective (`slo_ttft_ms`, `x-slo-ttft-ms`).
    #[default]
    Explicit,
    /// Every request: those without their own objective get `--slo-ttft-ms`.
    All,
}

impl SloAdmission {
    pub const NAMES: [&'static str; 3] = ["off", "explicit", "all"];

    pub fn parse(s: &str) -> Option<SloAdmission> {
        match s {
            "off" => Some(SloAdmission::Off),
            "explicit" => Some(SloAdmission::Explicit),
            "all" => Some(SloAdmission::All),
            _ => None,
        }
    }

    /// The objective a request is held to: its own, or under `All` the router's default.
    pub fn objective(self, own: Option<Duration>, default: Duration) -> Option<Duration> {
        match self {
            SloAdmission::Off => None,
            SloAdmission::Explicit => own,
            SloAdmission::All => Some(own.unwrap_or(default)),
        }
    }
}

/// What a prediction sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    /// Prompt tokens queued ahead of the request on the worker that computes it.
    pub ahead_tokens: u64,
    /// The request's own prompt tokens to compute (its prefix-cache hit excluded).
    pub uncached: u64,
    /// Prompt tokens a second a prefill computes, measured; `None`: nothing measured yet.
    pub prefill_rate: Option<f64>,
    /// Recent first tokens' time beyond their prediction (seconds, >= 0).
    pub residual: f64,
}

/// The predicted time to the first token; `None` until a prefill rate is measured.
pub fn predict(i: &Inputs) -> Option<Duration> {
    let rate = i.prefill_rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let secs = (i.ahead_tokens + i.uncached) as f64 / rate + i.residual.max(0.0);
    Some(Duration::from_secs_f64(secs.min(3600.0)))
}

/// What the rule says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Refused; try again after this long (the predicted overshoot, at least 1 s).
    Refuse {
        retry_after: Duration,
    },
}

/// Admits a request predicted to meet `slo`; refuses one predicted to miss it. No
/// objective, or no prediction yet: admitted.
pub fn decide(predicted: Option<Duration>, slo: Option<Duration>) -> Verdict {
    match (predicted, slo) {
        (Some(p), Some(s)) if p > s => {
            let over = (p - s).as_secs_f64().ceil().max(1.0);
            Verdict::Refuse { retry_after: Duration::from_secs_f64(over) }
        }
        _ => Verdict::Admit,
    }
}

/// Weight of the newest residual in its average.
const RESIDUAL_ALPHA: f64 = 0.2;

/// The residual the predictions add, learnt from finished first tokens.
#[derive(Debug, Default)]
pub struct TtftModel {
    residual: Mutex<f64>,
}

impl TtftModel {
    pub fn residual(&self) -> f64 {
        *self.residual.lock().expect("ttft model")
    }

    /// A first token came `actual` after admission, predicted at `predicted` (which
    /// included the residual then, `residual_then`): records the error and moves the
    /// residual toward what the queue-and-rate part missed.
    pub fn observe(&self, predicted: Duration, residual_then: f64, actual: Duration) {
        crate::metrics::ttft_prediction_error(actual.as_secs_f64() - predicted.as_secs_f64());
        let missed = (actual.as_secs_f64() - (predicted.as_secs_f64() - residual_then)).max(0.0);
        let mut r = self.residual.lock().expect("ttft model");
        *r += RESIDUAL_ALPHA * (missed - *r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_prediction_is_the_queue_and_the_prompt_at_the_rate_plus_the_residual() {
        // (ahead, uncached, rate, residual) -> ms
        let table: &[(u64, u64, Option<f64>, f64, Option<u64>)] = &[
            (0, 1000, Some(1000.0), 0.0, Some(1000)),
            (4000, 1000, Some(1000.0), 0.0, Some(5000)),
            (4000, 1000, Some(1000.0), 0.25, Some(5250)),
            (4000, 1000, None, 0.25, None),
            (4000, 1000, Some(0.0), 0.0, None),
        ];
        for &(ahead, uncached, rate, residual, want) in table {
            let got = predict(&Inputs { ahead_tokens: ahead, uncached, prefill_rate: rate, residual });
            assert_eq!(got.map(|d| d.as_millis() as u64), want, "{ahead} {uncached} {rate:?} {residual}");
        }
    }

    #[test]
    fn a_predicted_miss_is_refused_with_the_overshoot_as_retry_after() {
        let table: &[(Option<u64>, Option<u64>, Verdict)] = &[
            (Some(900), Some(1000), Verdict::Admit),
            (Some(1000), Some(1000), Verdict::Admit),
            (Some(1001), Some(1000), Verdict::Refuse { retry_after: ms(1000) }),
            (Some(3500), Some(1000), Verdict::Refuse { retry_after: ms(3000) }),
            (Some(99_000), None, Verdict::Admit),
            (None, Some(1), Verdict::Admit),
        ];
        for &(p, s, want) in table {
            assert_eq!(decide(p.map(ms), s.map(ms)), want, "{p:?} {s:?}");
        }
    }

    #[test]
    fn only_requests_with_an_objective_are_held_to_one_unless_all_are() {
        let d = ms(1000);
        assert_eq!(SloAdmission::Explicit.objective(None, d), None);
        assert_eq!(SloAdmission::Explicit.objective(Some(ms(5)), d), Some(ms(5)));
        assert_eq!(SloAdmission::All.objective(None, d), Some(d));
        assert_eq!(SloAdmission::All.objective(Some(ms(5)), d), Some(ms(5)));
        assert_eq!(SloAdmission::Off.objective(Some(ms(5)), d), None);
    }

    #[test]
    fn a_less_urgent_request_is_refused_first() {
        // Priority classes: the tokens ahead of a request count the same or more urgent
        // ones only, so a less urgent request sees at least as many: at any load, when the
        // urgent one is refused, so is the other.
        let rate = Some(1000.0);
        for queued_urgent in [0u64, 500, 900, 2000] {
            for queued_lax in [0u64, 300, 1500] {
                let urgent =
                    predict(&Inputs { ahead_tokens: queued_urgent, uncached: 100, prefill_rate: rate, residual: 0.1 });
                let lax = predict(&Inputs {
                    ahead_tokens: queued_urgent + queued_lax,
                    uncached: 100,
                    prefill_rate: rate,
                    residual: 0.1,
                });
                let slo = Some(ms(1000));
                if decide(urgent, slo) != Verdict::Admit {
                    assert_ne!(decide(lax, slo), Verdict::Admit);
                }
            }
        }
    }

    #[test]
    fn the_residual_learns_what_the_queue_did_not_explain() {
        let m = TtftModel::default();
        for _ in 0..50 {
            let r = m.residual();
            // Predicted 100 ms of prefill plus the residual; the first token took 600 ms.
            m.observe(ms(100) + Duration::from_secs_f64(r), r, ms(600));
        }
        assert!((m.residual() - 0.5).abs() < 0.01, "{}", m.residual());
    }
}
