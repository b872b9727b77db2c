//! `tandem sim --search`: the placement search of DistServe. For a workload and its SLOs,
//! every split of `--workers` into P prefill and D decode workers (P = 0: every worker of
//! role `both`, prefilling its own requests), at each decode batch limit of
//! `--search-max-seqs`, gets the highest request rate at which `--attainment` of requests
//! meet the SLO (bisection over the rate, each point a simulation of the same seeded
//! workload); a configuration's score is that rate's goodput per worker.
//!
//! `--study distserve` runs the searches behind DistServe's two qualitative findings and
//! draws them: how the best split moves with prompt and output length, and how much
//! disaggregation gains over colocation as the TPOT objective loosens.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Result};
use clap::Args;

use super::cost::Costs;
use super::{simulate, to_run, SimArgs};
use crate::bench_serve::plot::{lines, Panel};

#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// Search the prefill/decode split instead of simulating one cluster.
    #[arg(long)]
    pub search: bool,
    /// Workers to split (every P + D = this).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Prefill workers step by this many between splits (1: every split; at hundreds of
    /// workers, a coarser grid).
    #[arg(long, default_value_t = 1)]
    pub split_step: usize,
    /// Decode batch limits (`--max-seqs`) to try at each split.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub search_max_seqs: Vec<usize>,
    /// Share of requests that must meet the SLO at a rate for it to count.
    #[arg(long, default_value_t = 0.9)]
    pub attainment: f64,
    /// The highest rate tried (requests/s in all).
    #[arg(long, default_value_t = 64.0)]
    pub max_rate: f64,
    /// Bisection steps per configuration.
    #[arg(long, default_value_t = 10)]
    pub bisect: usize,
    /// Configurations printed, best first.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// `distserve`: the searches behind DistServe's findings, printed and (with --plot) drawn.
    #[arg(long)]
    pub study: Option<String>,
}

/// One configuration's result.
#[derive(Debug, Clone)]
pub struct Scored {
    pub prefill: usize,
    pub decode: usize,
    pub max_seqs: usize,
    /// The highest rate that met the attainment (0: none did).
    pub rate: f64,
    pub goodput_per_worker: f64,
    pub ttft_p90_ms: f64,
    pub tpot_p90_ms: f64,
}

/// SLO attainment of `a`'s workload on P prefill and D decode workers at `rate`, with the
/// run's TTFT and TPOT p90.
fn attain(a: &SimArgs, costs: &Costs, p: usize, d: usize, max_seqs: usize, rate: f64) -> Result<(f64, f64, f64)> {
    let mut args = a.clone();
    (args.prefill, args.decode, args.both) = if p == 0 { (0, 0, d) } else { (p, d, 0) };
    args.max_seqs = max_seqs;
    let cfg = args.config(costs)?;
    let report = simulate(&args, costs, cfg, Some(rate), 0)?;
    let run = to_run(&report, String::new(), Some(rate));
    let v = run.json(&a.slo());
    let f = |k: &str, q: &str| v[k][q].as_f64().unwrap_or(f64::INFINITY);
    Ok((v["slo_attainment"].as_f64().unwrap_or(0.0), f("ttft_ms", "p90"), f("tpot_ms", "p90")))
}

/// The highest rate (within `max_rate`, to `bisect` halvings) where `a`'s workload meets
/// the attainment on this configuration.
fn score(a: &SimArgs, costs: &Costs, p: usize, d: usize, max_seqs: usize) -> Result<Scored> {
    let s = &a.search;
    let (mut lo, mut hi) = (0.0f64, s.max_rate);
    let mut best = (0.0, f64::NAN, f64::NAN);
    let top = attain(a, costs, p, d, max_seqs, hi)?;
    if top.0 >= s.attainment {
        lo = hi;
        best = top;
    } else {
        for _ in 0..s.bisect {
            let mid = (lo + hi) / 2.0;
            let r = attain(a, costs, p, d, max_seqs, mid)?;
            if r.0 >= s.attainment {
                lo = mid;
                best = r;
            } else {
                hi = mid;
            }
        }
    }
    let n = (p + d) as f64;
    Ok(Scored {
        prefill: p,
        decode: d,
        max_seqs,
        rate: lo,
        goodput_per_worker: lo * best.0 / n,
        ttft_p90_ms: best.1,
        tpot_p90_ms: best.2,
    })
}

/// Every configuration of `a`'s search, scored on every core.
pub fn search(a: &SimArgs, costs: &Costs) -> Result<Vec<Scored>> {
    let s = &a.search;
    if a.slo_ttft_ms.is_none() && a.slo_tpot_ms.is_none() {
        bail!("--search needs an objective: --slo-ttft-ms and/or --slo-tpot-ms");
    }
    if s.workers == 0
        || s.split_step == 0
        || s.search_max_seqs.contains(&0)
        || s.max_rate.is_nan()
        || s.max_rate <= 0.0
        || !(0.0..=1.0).contains(&s.attainment)
    {
        bail!("--workers, --split-step, --search-max-seqs and --max-rate must be positive, --attainment in [0, 1]");
    }
    let mut configs = Vec::new();
    for p in (0..s.workers).step_by(s.split_step) {
        for &m in &s.search_max_seqs {
            configs.push((p, s.workers - p, m));
        }
    }
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(configs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(p, d, m)) = configs.get(i) else { return };
                let r = score(a, costs, p, d, m);
                out.lock().expect("results").push(r);
            });
        }
    });
    let mut scored = out.into_inner().expect("results").into_iter().collect::<Result<Vec<_>>>()?;
    scored.sort_by(|x, y| {
        y.goodput_per_worker
            .total_cmp(&x.goodput_per_worker)
            .then((x.prefill, x.max_seqs).cmp(&(y.prefill, y.max_seqs)))
    });
    Ok(scored)
}

/// For each split, its best batch limit: the frontier the chart draws.
fn frontier(scored: &[Scored]) -> Vec<&Scored> {
    let mut best: Vec<&Scored> = Vec::new();
    for s in scored {
        if !best.iter().any(|b| b.prefill == s.prefill) {
            best.push(s);
        }
    }
    best.sort_by_key(|s| s.prefill);
    best
}

fn split_name(s: &Scored) -> String {
    if s.prefill == 0 {
        format!("{}B (colocated)", s.decode)
    } else {
        format!("{}P{}D", s.prefill, s.decode)
    }
}

pub fn run(a: &SimArgs, costs: &Costs) -> Result<()> {
    if let Some(study) = &a.search.study {
        return match study.as_str() {
            "distserve" => distserve(a, costs),
            other => bail!("--study {other:?}: the study is `distserve`"),
        };
    }
    let scored = search(a, costs)?;
    let front = frontier(&scored);
    if a.json {
        for s in &scored {
            println!("{}", json(s));
        }
    } else {
        println!(
            "workload {} · SLO ttft {:?} ms, tpot {:?} ms at {:.0}% · {} workers · costs: {}",
            a.w.workload,
            a.slo_ttft_ms,
            a.slo_tpot_ms,
            a.search.attainment * 100.0,
            a.search.workers,
            costs.source
        );
        println!("best:");
        println!("| split | max seqs | rate (req/s) | goodput per worker | TTFT p90 ms | TPOT p90 ms |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for s in scored.iter().take(a.search.top) {
            println!("{}", row(s));
        }
        println!("frontier (each split at its best batch limit):");
        for s in &front {
            println!("{}", row(s));
        }
    }
    if let Some(p) = &a.plot {
        let mut series = Vec::new();
        for &m in &a.search.search_max_seqs {
            let mut pts: Vec<(f64, f64)> =
                scored.iter().filter(|s| s.max_seqs == m).map(|s| (s.prefill as f64, s.goodput_per_worker)).collect();
            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
            series.push((format!("max seqs {m}"), pts));
        }
        lines(
            p,
            &[Panel {
                title: format!("Goodput per worker by split ({} workers)", a.search.workers),
                x_desc: "prefill workers (0: all role both)".into(),
                y_desc: "req/s per worker at SLO".into(),
                series,
            }],
        )?;
    }
    Ok(())
}

fn row(s: &Scored) -> String {
    format!(
        "| {} | {} | {:.3} | {:.3} | {:.0} | {:.1} |",
        split_name(s),
        s.max_seqs,
        s.rate,
        s.goodput_per_worker,
        s.ttft_p90_ms,
        s.tpot_p90_ms
    )
}

fn json(s: &Scored) -> serde_json::Value {
    serde_json::json!({
        "prefill": s.prefill, "decode": s.decode, "max_seqs": s.max_seqs, "rate": s.rate,
        "goodput_per_worker": s.goodput_per_worker, "ttft_p90_ms": s.ttft_p90_ms, "tpot_p90_ms": s.tpot_p90_ms,
    })
}

/// The best disaggregated split's share of prefill workers, and the best colocated and
/// best disaggregated goodput per worker.
fn best_split(scored: &[Scored]) -> (f64, f64, f64) {
    let disagg =
        scored.iter().filter(|s| s.prefill > 0).max_by(|x, y| x.goodput_per_worker.total_cmp(&y.goodput_per_worker));
    let colo = scored.iter().filter(|s| s.prefill == 0).map(|s| s.goodput_per_worker).fold(0.0, f64::max);
    match disagg {
        Some(d) => (d.prefill as f64 / (d.prefill + d.decode) as f64, colo, d.goodput_per_worker),
        None => (0.0, colo, 0.0),
    }
}

/// DistServe's findings, from searches over `random:IN:OUT` workloads on `a`'s workers:
/// 1. the best split's prefill share as prompts grow (outputs fixed) and as outputs grow
///    (prompts fixed);
/// 2. the best colocated and disaggregated goodput per worker as the TPOT SLO loosens.
fn distserve(a: &SimArgs, costs: &Costs) -> Result<()> {
    let base_in = 512usize;
    let base_out = 128u32;
    let with = |input: usize, output: u32, tpot: Option<f64>| -> SimArgs {
        let mut x = a.clone();
        x.w.workload = format!("random:{input}:{output}");
        x.w.max_tokens = None;
        if tpot.is_some() {
            x.slo_tpot_ms = tpot;
        }
        x
    };
    let mut by_input = Vec::new();
    for input in [128usize, 256, 512, 1024, 2048] {
        let (share, _, _) = best_split(&search(&with(input, base_out, None), costs)?);
        println!(
            "{}",
            serde_json::json!({"finding": "input", "input": input, "output": base_out, "best_prefill_share": share})
        );
        by_input.push((input as f64, share));
    }
    let mut by_output = Vec::new();
    for output in [32u32, 64, 128, 256, 512] {
        let (share, _, _) = best_split(&search(&with(base_in, output, None), costs)?);
        println!(
            "{}",
            serde_json::json!({"finding": "output", "input": base_in, "output": output, "best_prefill_share": share})
        );
        by_output.push((f64::from(output), share));
    }
    let tpot0 = a.slo_tpot_ms.unwrap_or(100.0);
    let (mut colo, mut disagg) = (Vec::new(), Vec::new());
    for k in [0.5, 1.0, 2.0, 4.0, 8.0] {
        let tpot = tpot0 * k;
        let (_, c, d) = best_split(&search(&with(base_in, base_out, Some(tpot)), costs)?);
        println!("{}", serde_json::json!({"finding": "tpot", "slo_tpot_ms": tpot, "colocated": c, "disaggregated": d}));
        colo.push((tpot, c));
        disagg.push((tpot, d));
    }
    if let Some(p) = &a.plot {
        lines(
            p,
            &[
                Panel {
                    title: format!("Best prefill share vs prompt ({base_out} out)"),
                    x_desc: "prompt tokens".into(),
                    y_desc: "prefill workers / workers".into(),
                    series: vec![("best split".into(), by_input)],
                },
                Panel {
                    title: format!("Best prefill share vs output ({base_in} in)"),
                    x_desc: "output tokens".into(),
                    y_desc: "prefill workers / workers".into(),
                    series: vec![("best split".into(), by_output)],
                },
                Panel {
                    title: "Goodput per worker vs TPOT SLO".into(),
                    x_desc: "TPOT SLO (ms)".into(),
                    y_desc: "req/s per worker at SLO".into(),
                    series: vec![("colocated (role both)".into(), colo), ("disaggregated".into(), disagg)],
                },
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: usize, m: usize, g: f64) -> Scored {
        Scored {
            prefill: p,
            decode: 4 - p,
            max_seqs: m,
            rate: g * 4.0,
            goodput_per_worker: g,
            ttft_p90_ms: 0.0,
            tpot_p90_ms: 0.0,
        }
    }

    #[test]
    fn the_frontier_keeps_each_splits_best_and_the_best_split_is_disaggregated_or_not() {
        let scored = vec![s(1, 64, 3.0), s(0, 16, 2.5), s(1, 16, 2.0), s(2, 64, 1.0), s(0, 64, 0.5)];
        let f = frontier(&scored);
        assert_eq!(f.iter().map(|x| (x.prefill, x.max_seqs)).collect::<Vec<_>>(), vec![(0, 16), (1, 64), (2, 64)]);
        assert_eq!(best_split(&scored), (0.25, 2.5, 3.0));
    }
}
