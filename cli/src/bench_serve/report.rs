//! Percentiles, SLO attainment and goodput of a run, as text, JSON and a PNG. A run of a
//! phased workload also gets them per phase, under `phases`.

use serde_json::{json, Value};

use super::client::Sample;

/// One run: a rate (open loop) or a concurrency (closed loop), and what it measured.
pub struct Run {
    /// `rate=2` or `concurrency=8`.
    pub label: String,
    pub rate: Option<f64>,
    pub samples: Vec<Sample>,
    pub wall_s: f64,
    /// A replayed trace's: the share of prompt tokens one infinite cache would have served.
    pub ideal_hit_rate: Option<f64>,
}

/// Service-level objectives: a request meets them when both hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn met(&self, s: &Sample) -> bool {
        s.ok && self.ttft_ms.is_none_or(|t| s.ttft.as_secs_f64() * 1e3 <= t)
            && self.tpot_ms.is_none_or(|t| s.tpot().is_none_or(|x| x * 1e3 <= t))
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    json!({"mean": mean, "p50": percentile(&v, 0.5), "p90": percentile(&v, 0.9), "p99": percentile(&v, 0.99)})
}

/// The figures of one phase of a run: its requests' SLO attainment, goodput, throughput and
/// latencies. Its rates are over its own time, from its first request sent to its last ended
/// (the run's end, `run_wall_s`, when one never did), so phases that overlap a little at the
/// shift are not diluted by each other's time.
fn phase_json(phase: u32, samples: &[&Sample], run_wall_s: f64, slo: &Slo) -> Value {
    let ok: Vec<&Sample> = samples.iter().copied().filter(|s| s.ok).collect();
    let ms = |x: f64| x * 1e3;
    let begin = samples.iter().filter_map(|s| s.span).map(|(b, _)| b).fold(f64::INFINITY, f64::min);
    let end = if samples.iter().all(|s| s.span.is_some()) {
        samples.iter().filter_map(|s| s.span).map(|(_, e)| e).fold(0.0, f64::max)
    } else {
        run_wall_s
    };
    let wall_s = (end - if begin.is_finite() { begin } else { 0.0 }).max(1e-9);
    let tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    let prompt: usize = ok.iter().map(|s| s.prompt_tokens).sum();
    let met = samples.iter().filter(|s| slo.met(s)).count();
    let n = samples.len().max(1) as f64;
    json!({
        "phase": phase,
        "requests": samples.len(),
        "failed": samples.len() - ok.len(),
        "wall_s": wall_s,
        "prompt_tokens_mean": prompt as f64 / ok.len().max(1) as f64,
        "output_tok_s": tokens as f64 / wall_s,
        "ttft_ms": summary(ok.iter().map(|s| ms(s.ttft.as_secs_f64())).collect()),
        "tpot_ms": summary(ok.iter().filter_map(|s| s.tpot()).map(ms).collect()),
        "slo_attainment": met as f64 / n,
        "goodput_rps": met as f64 / wall_s,
        "rejection_rate": (samples.len() - ok.len()) as f64 / n,
    })
}

/// The service a request took at the `fair` policy's default costs: its computed prompt
/// tokens at 1, its output tokens at 2.
fn service(s: &Sample) -> f64 {
    if !s.ok {
        return 0.0;
    }
    s.prompt_tokens.saturating_sub(s.cached_tokens) as f64 + 2.0 * s.output_tokens as f64
}

/// E2E latency of the tenth of requests with the most output tokens.
fn longest_decile(ok: &[&Sample]) -> Value {
    let mut by_len: Vec<&&Sample> = ok.iter().collect();
    by_len.sort_by_key(|s| std::cmp::Reverse(s.output_tokens));
    let n = by_len.len().div_ceil(10);
    summary(by_len[..n].iter().map(|s| s.e2e.as_secs_f64() * 1e3).collect())
}

/// When a request's service happened: (seconds from the run's start, amount), its computed
/// prompt and first token at the first token, each later token at its arrival.
fn service_events(s: &Sample) -> Vec<(f64, f64)> {
    let Some((sent, _)) = s.span.filter(|_| s.ok) else { return Vec::new() };
    let mut t = sent + s.ttft.as_secs_f64();
    let mut ev = vec![(t, s.prompt_tokens.saturating_sub(s.cached_tokens) as f64 + 2.0)];
    for gap in &s.itl {
        t += gap;
        ev.push((t, 2.0));
    }
    ev
}

/// Intervals (union) in which a tenant had a request waiting for its first token.
fn backlogged(samples: &[&Sample]) -> Vec<(f64, f64)> {
    let mut iv: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| {
            let (sent, end) = s.span?;
            Some((sent, if s.ok { sent + s.ttft.as_secs_f64() } else { end }))
        })
        .collect();
    iv.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (a, b) in iv {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The largest difference in service two tenants received over any stretch of time in
/// which both were backlogged (VTC's fairness measure), and how long both were.
fn service_gap(a: &[&Sample], b: &[&Sample]) -> (f64, f64) {
    let (ia, ib) = (backlogged(a), backlogged(b));
    let mut both = Vec::new();
    for &(a0, a1) in &ia {
        for &(b0, b1) in &ib {
            let (s, e) = (a0.max(b0), a1.min(b1));
            if s < e {
                both.push((s, e));
            }
        }
    }
    let mut ev: Vec<(f64, f64)> = a.iter().flat_map(|s| service_events(s)).collect();
    ev.extend(b.iter().flat_map(|s| service_events(s)).map(|(t, x)| (t, -x)));
    ev.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut worst: f64 = 0.0;
    for &(s, e) in &both {
        let (mut d, mut lo, mut hi) = (0.0f64, 0.0f64, 0.0f64);
        for &(_, x) in ev.iter().filter(|(t, _)| *t >= s && *t <= e) {
            d += x;
            lo = lo.min(d);
            hi = hi.max(d);
        }
        worst = worst.max(hi - lo);
    }
    (worst, both.iter().map(|(s, e)| e - s).sum())
}

impl Run {
    /// The run's figures; with `phases` (one object per phase, in order) when its requests
    /// carry phases. Requests without a phase count in the run's figures only.
    pub fn json(&self, slo: &Slo) -> Value {
        let ok: Vec<&Sample> = self.samples.iter().filter(|s| s.ok).collect();
        let ms = |x: f64| x * 1e3;
        let tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
        let met = self.samples.iter().filter(|s| slo.met(s)).count();
        let n = self.samples.len().max(1) as f64;
        let first_error = self.samples.iter().find_map(|s| s.error.clone());
        let prompt: usize = ok.iter().map(|s| s.prompt_tokens).sum();
        let cached: usize = ok.iter().map(|s| s.cached_tokens).sum();
        let mut v = json!({
            "run": self.label,
            "rate": self.rate,
            "requests": self.samples.len(),
            "failed": self.samples.len() - ok.len(),
            "first_error": first_error,
            "wall_s": self.wall_s,
            "prompt_tokens_mean": prompt as f64 / ok.len().max(1) as f64,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "prefix_hit_rate": cached as f64 / prompt.max(1) as f64,
            "ideal_hit_rate": self.ideal_hit_rate,
            "throughput_rps": ok.len() as f64 / self.wall_s,
            "output_tok_s": tokens as f64 / self.wall_s,
            "ttft_ms": summary(ok.iter().map(|s| ms(s.ttft.as_secs_f64())).collect()),
            "tpot_ms": summary(ok.iter().filter_map(|s| s.tpot()).map(ms).collect()),
            "itl_ms": summary(ok.iter().flat_map(|s| s.itl.iter().copied()).map(ms).collect()),
            "e2e_ms": summary(ok.iter().map(|s| ms(s.e2e.as_secs_f64())).collect()),
            "slo_ttft_ms": slo.ttft_ms,
            "slo_tpot_ms": slo.tpot_ms,
            "slo_attainment": met as f64 / n,
            "goodput_rps": met as f64 / self.wall_s,
            "rejection_rate": (self.samples.len() - ok.len()) as f64 / n,
        });
        v["refused"] = self.samples.iter().filter(|s| s.refused).count().into();
        v["refusal_rate"] = (self.samples.iter().filter(|s| s.refused).count() as f64 / n).into();
        v["e2e_ms_longest_decile"] = longest_decile(&ok);
        let mut tenants: Vec<&str> = self.samples.iter().filter_map(|s| s.tenant.as_deref()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        if !tenants.is_empty() {
            let of =
                |t: &str| -> Vec<&Sample> { self.samples.iter().filter(|s| s.tenant.as_deref() == Some(t)).collect() };
            v["tenants"] = tenants
                .iter()
                .map(|&t| {
                    let mut j = phase_json(0, &of(t), self.wall_s, slo);
                    j.as_object_mut().expect("object").remove("phase");
                    j["tenant"] = t.into();
                    j["refused"] = of(t).iter().filter(|s| s.refused).count().into();
                    j["e2e_ms"] = summary(of(t).iter().filter(|s| s.ok).map(|s| s.e2e.as_secs_f64() * 1e3).collect());
                    j["service"] = of(t).iter().map(|s| service(s)).sum::<f64>().into();
                    j
                })
                .collect();
            if tenants.len() >= 2 {
                let (gap, both) = service_gap(&of(tenants[0]), &of(tenants[1]));
                let most = ok.iter().map(|s| service(s)).fold(0.0, f64::max);
                v["fairness"] = json!({
                    "tenants": [tenants[0], tenants[1]],
                    "both_backlogged_s": both,
                    "service_gap_max": gap,
                    "bound_2u": 2.0 * most,
                    "costs": "prompt token 1, output token 2 (the workers' fair defaults)",
                });
            }
        }
        let mut phases: Vec<u32> = self.samples.iter().filter_map(|s| s.phase).collect();
        phases.sort_unstable();
        phases.dedup();
        if !phases.is_empty() {
            let of = |p: u32| -> Vec<&Sample> { self.samples.iter().filter(|s| s.phase == Some(p)).collect() };
            v["phases"] = phases.into_iter().map(|p| phase_json(p, &of(p), self.wall_s, slo)).collect();
        }
        v
    }

    pub fn print(&self, v: &Value) {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "{}: {} requests ({} failed; {:.0} prompt tokens on average) in {:.2} s",
            self.label,
            v["requests"],
            v["failed"],
            f("prompt_tokens_mean"),
            f("wall_s")
        );
        if let Some(e) = v["first_error"].as_str() {
            println!("  first error: {e}");
        }
        println!("  throughput {:.2} req/s, {:.1} output tok/s", f("throughput_rps"), f("output_tok_s"));
        for k in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            let s = &v[k];
            let g = |p: &str| s[p].as_f64().unwrap_or(0.0);
            println!(
                "  {:<8} mean {:>8.1} ms  p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}",
                k.trim_end_matches("_ms"),
                g("mean"),
                g("p50"),
                g("p90"),
                g("p99")
            );
        }
        println!(
            "  SLO attainment {:.1}%, goodput {:.2} req/s, rejection rate {:.1}%",
            100.0 * f("slo_attainment"),
            f("goodput_rps"),
            100.0 * f("rejection_rate")
        );
        for p in v["phases"].as_array().into_iter().flatten() {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            let g = |k: &str, q: &str| p[k][q].as_f64().unwrap_or(0.0);
            println!(
                "  phase {}: {} requests ({} failed; {:.0} prompt tokens on average) in {:.2} s: SLO attainment \
                 {:.1}%, goodput {:.2} req/s, {:.1} output tok/s, TTFT p50 {:.1} ms p90 {:.1}, TPOT p50 {:.1} ms p90 {:.1}",
                p["phase"],
                p["requests"],
                p["failed"],
                f("prompt_tokens_mean"),
                f("wall_s"),
                100.0 * f("slo_attainment"),
                f("goodput_rps"),
                f("output_tok_s"),
                g("ttft_ms", "p50"),
                g("ttft_ms", "p90"),
                g("tpot_ms", "p50"),
                g("tpot_ms", "p90")
            );
        }
        if f("refused") > 0.0 {
            println!("  refused for load {} ({:.1}% of requests)", v["refused"], 100.0 * f("refusal_rate"));
        }
        let d = &v["e2e_ms_longest_decile"];
        println!(
            "  e2e of the longest tenth (by output) mean {:.1} ms p99 {:.1}",
            d["mean"].as_f64().unwrap_or(0.0),
            d["p99"].as_f64().unwrap_or(0.0)
        );
        for t in v["tenants"].as_array().into_iter().flatten() {
            let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
            let g = |k: &str, q: &str| t[k][q].as_f64().unwrap_or(0.0);
            println!(
                "  tenant {}: {} requests ({} failed, {} refused): TTFT p50 {:.1} ms p99 {:.1}, e2e mean {:.1} ms, \
                 {:.1} output tok/s, service {:.0}, SLO attainment {:.1}%, goodput {:.2} req/s",
                t["tenant"],
                t["requests"],
                t["failed"],
                t["refused"],
                g("ttft_ms", "p50"),
                g("ttft_ms", "p99"),
                g("e2e_ms", "mean"),
                f("output_tok_s"),
                f("service"),
                100.0 * f("slo_attainment"),
                f("goodput_rps"),
            );
        }
        if let Some(fair) = v.get("fairness") {
            println!(
                "  fairness: both backlogged {:.1} s; largest service gap then {:.0} (2U, U the most one request took: {:.0})",
                fair["both_backlogged_s"].as_f64().unwrap_or(0.0),
                fair["service_gap_max"].as_f64().unwrap_or(0.0),
                fair["bound_2u"].as_f64().unwrap_or(0.0)
            );
        }
        let ideal = v["ideal_hit_rate"].as_f64().map(|x| format!(" (the trace's ideal: {:.1}%)", 100.0 * x));
        println!(
            "  prefix hit rate {:.1}%{}: {} of {} prompt tokens cached",
            100.0 * f("prefix_hit_rate"),
            ideal.unwrap_or_default(),
            v["cached_tokens"],
            v["prompt_tokens"]
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn hit_and_rejection_rates() {
        let ok =
            |prompt, cached| Sample { ok: true, prompt_tokens: prompt, cached_tokens: cached, ..Sample::default() };
        let failed = Sample { error: Some("RESOURCE_EXHAUSTED".into()), ..Sample::default() };
        let run = Run {
            label: "rate=1".into(),
            rate: Some(1.0),
            samples: vec![ok(100, 40), failed, ok(60, 0), ok(40, 40)],
            wall_s: 2.0,
            ideal_hit_rate: Some(0.5),
        };
        let v = run.json(&Slo::default());
        assert_eq!(v["prefix_hit_rate"], 0.4, "80 of 200 prompt tokens, the failed request's none");
        assert_eq!(v["rejection_rate"], 0.25);
        assert_eq!(v["ideal_hit_rate"], 0.5);
        assert_eq!(v["goodput_rps"], 1.5);
        assert!(v.get("phases").is_none(), "no phases, no split");
        let none = Run { samples: vec![], ideal_hit_rate: None, ..run };
        assert_eq!(none.json(&Slo::default())["prefix_hit_rate"], 0.0);
    }

    #[test]
    fn phases_get_their_own_figures_over_their_own_time() {
        let ms = Duration::from_millis;
        let done = |phase, span, ttft, tokens| Sample {
            ok: true,
            phase: Some(phase),
            span: Some(span),
            ttft: ms(ttft),
            e2e: ms(ttft + 10 * (tokens as u64 - 1)),
            output_tokens: tokens,
            ..Sample::default()
        };
        let lost =
            Sample { phase: Some(1), error: Some("did not finish within --timeout".into()), ..Sample::default() };
        let run = Run {
            label: "rate=1".into(),
            rate: Some(1.0),
            // Phase 1 listed first: phases are reported in order all the same.
            samples: vec![
                done(1, (1.0, 3.0), 100, 201),
                lost,
                done(0, (0.0, 1.0), 900, 33),
                done(0, (0.5, 2.0), 3000, 33),
            ],
            wall_s: 5.0,
            ideal_hit_rate: None,
        };
        let v = run.json(&Slo { ttft_ms: Some(1000.0), tpot_ms: Some(50.0) });
        assert_eq!(v["goodput_rps"], 0.4, "2 of 4 met over the run's 5 s");
        let p = v["phases"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((&p[0]["phase"], &p[0]["requests"], &p[0]["wall_s"]), (&json!(0), &json!(2), &json!(2.0)));
        assert_eq!(p[0]["slo_attainment"], 0.5, "3 s TTFT misses");
        assert_eq!(p[0]["goodput_rps"], 0.5);
        assert_eq!(p[0]["output_tok_s"], 33.0);
        assert_eq!(p[0]["ttft_ms"]["p90"], 3000.0);
        // Phase 1 has a request that never ended: its time runs to the run's end.
        assert_eq!((&p[1]["requests"], &p[1]["failed"], &p[1]["wall_s"]), (&json!(2), &json!(1), &json!(4.0)));
        assert_eq!(p[1]["rejection_rate"], 0.5);
        assert_eq!(p[1]["goodput_rps"], 0.25);
        assert_eq!(p[1]["tpot_ms"]["p50"], 10.0);
    }
}
