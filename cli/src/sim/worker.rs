//! One simulated worker: the engine's `Scheduler` over its `BlockManager`, the requests
//! (jobs) it holds for the simulated cluster, its step in progress, and what the router
//! counts and last saw of it.

use std::collections::HashMap;

use tandem_cluster::{KvEndpoints, ModelInfo, Role, WorkerDescriptor, WorkerId};
use tandem_engine::block_manager::BlockManager;
use tandem_engine::scheduler::{NewRequest, RequestId, Scheduler, SchedulerConfig, StepPlan};
use tandem_proto::tandem::worker::v1 as pb;

use super::cost::Costs;

/// The simulated model's name, as requests and workers give it.
pub(super) const MODEL: &str = "sim";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    /// Computes the prompt and samples the first token; its KV goes to the decode worker.
    Prefill,
    /// Decodes a prompt whose KV comes from a prefill worker.
    Decode,
    /// The whole request on one worker.
    Local,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Job {
    pub(super) req: usize,
    pub(super) kind: JobKind,
    /// When its first step began (a prefill's compute time, for the transfer's overlap).
    pub(super) first_step: Option<u64>,
    /// Prompt tokens it is expected to compute (for the load report, until it starts).
    pub(super) uncached_guess: usize,
}

pub(super) struct Worker {
    pub(super) desc: WorkerDescriptor,
    pub(super) sched: Scheduler,
    pub(super) jobs: HashMap<RequestId, Job>,
    pub(super) next_id: u64,
    pub(super) stepping: Option<StepPlan>,
    /// When the running step ends.
    pub(super) step_ends: u64,
    /// The report the router last polled.
    pub(super) published: Option<pb::StatsResponse>,
    pub(super) next_event: u64,
    /// This router's live counts for it (`members::InFlight`).
    pub(super) inflight: u64,
    pub(super) inflight_tokens: u64,
    pub(super) steps: u64,
    pub(super) busy_ns: u64,
    /// Requests whose KV arrived during the running step: taken when it ends.
    pub(super) kv_ready: Vec<usize>,
}

impl Worker {
    pub(super) fn new(
        role: Role,
        id: String,
        sched: SchedulerConfig,
        costs: &Costs,
        prefix_caching: bool,
    ) -> anyhow::Result<Worker> {
        let desc = WorkerDescriptor {
            id: WorkerId::new(id)?,
            role,
            grpc_addr: "sim".into(),
            kv: KvEndpoints { tcp: "127.0.0.1:1".parse()?, local: None },
            model: ModelInfo { name: MODEL.into(), fingerprint: 1 },
            block_size: costs.block_size as u32,
            hash_scheme: prefix_caching.then(|| tandem_text::prefix::SCHEME.to_string()),
            context_length: sched.max_model_len as u32,
            lease: None,
        };
        let blocks = BlockManager::new(costs.kv_blocks, costs.block_size, prefix_caching);
        Ok(Worker {
            desc,
            sched: Scheduler::new(sched, blocks),
            jobs: HashMap::new(),
            next_id: 1,
            stepping: None,
            step_ends: 0,
            published: None,
            next_event: 1,
            inflight: 0,
            inflight_tokens: 0,
            steps: 0,
            busy_ns: 0,
            kv_ready: Vec::new(),
        })
    }

    /// A request into the engine; `Err((why, refused))`: refused for load (the engine's
    /// queue is full), or not refused but invalid (a prompt longer than the context).
    pub(super) fn add(
        &mut self,
        mut n: NewRequest,
        req: usize,
        kind: JobKind,
        uncached_guess: usize,
    ) -> Result<RequestId, (String, bool)> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        n.id = id;
        self.sched
            .add(n)
            .map_err(|e| (e.to_string(), !matches!(e, tandem_engine::error::EngineError::InvalidRequest(_))))?;
        self.jobs.insert(id, Job { req, kind, first_step: None, uncached_guess });
        Ok(id)
    }

    /// A reservation for KV to come; `Err(true)`: no room.
    pub(super) fn add_remote(&mut self, mut n: NewRequest, req: usize) -> Result<(RequestId, usize), bool> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        n.id = id;
        match self.sched.add_remote(n) {
            Ok((_, cached)) => {
                self.jobs.insert(id, Job { req, kind: JobKind::Decode, first_step: None, uncached_guess: 0 });
                Ok((id, cached))
            }
            Err(tandem_engine::error::EngineError::OutOfBlocks(_)) => Err(true),
            Err(_) => Err(false),
        }
    }

    pub(super) fn drop_job(&mut self, id: RequestId) {
        self.sched.finish(id, tandem_engine::finish::FinishReason::Abort);
        self.sched.take_finished(id);
        self.jobs.remove(&id);
    }

    /// Its load report, as the router's pollers fetch it: the scheduler's counts, and the
    /// prompt tokens left to compute (a request not started yet counts what its prefix-cache
    /// lookup is expected to leave).
    pub(super) fn report(&self) -> pb::StatsResponse {
        let st = self.sched.stats();
        let mut queued = 0u64;
        for (id, j) in &self.jobs {
            if j.kind == JobKind::Decode {
                continue;
            }
            if let Some(r) = self.sched.get(*id) {
                let left =
                    if r.num_computed == 0 { j.uncached_guess } else { r.prompt.len().saturating_sub(r.num_computed) };
                queued += left as u64;
            }
        }
        pb::StatsResponse {
            running: st.running as u32,
            waiting: st.waiting as u32,
            kv_blocks_used: st.blocks_used as u32,
            kv_blocks_total: st.blocks_total as u32,
            queued_prefill_tokens: queued,
            ..Default::default()
        }
    }
}
