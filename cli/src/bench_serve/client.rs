//! Sends one request and times it, over Tandem's gRPC API or any OpenAI-compatible
//! HTTP server (Tandem's, llama.cpp's `llama-server`, vLLM, ...). Greedy, with EOS
//! ignored where the server allows, so each request generates its output length.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_client::GenerateClient;
use tonic::transport::Channel;

use super::workload::Item;

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ok: bool,
    pub error: Option<String>,
    pub ttft: Duration,
    pub e2e: Duration,
    pub output_tokens: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens the server served from its prefix cache, as its usage reports them.
    pub cached_tokens: usize,
    /// Gaps between consecutive token arrivals after the first (a chunk of k tokens counts k gaps).
    pub itl: Vec<f64>,
    /// The request's phase, of a phased workload.
    pub phase: Option<u32>,
    /// Seconds from the run's start to when the request was sent and to when it ended;
    /// `None` for one that did not end within the run.
    pub span: Option<(f64, f64)>,
    /// Refused for load (RESOURCE_EXHAUSTED, HTTP 429) rather than failed.
    pub refused: bool,
    /// The tenant that sent it (its `--tenant` name).
    pub tenant: Option<String>,
}

impl Sample {
    /// Time per output token after the first, seconds.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2e - self.ttft).as_secs_f64() / (self.output_tokens - 1) as f64)
    }
}

#[derive(Clone)]
pub enum Client {
    Grpc { client: GenerateClient<Channel>, key: Option<String> },
    OpenAi { http: reqwest::Client, base: String, model: String, key: Option<String> },
}

/// Token arrivals, folded into a sample as they come.
struct Clock {
    t0: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    itl: Vec<f64>,
}

impl Clock {
    fn new() -> Clock {
        Clock { t0: Instant::now(), first: None, last: None, tokens: 0, itl: Vec::new() }
    }
    fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last {
            None => self.first = Some(now),
            Some(last) => {
                let gap = (now - last).as_secs_f64() / n as f64;
                self.itl.extend(std::iter::repeat_n(gap, n));
            }
        }
        // The first chunk's extra tokens arrive with it: no gaps for them.
        self.last = Some(now);
        self.tokens += n;
    }
    fn done(self, prompt_tokens: usize, cached_tokens: usize, reported_tokens: Option<usize>) -> Sample {
        let e2e = self.t0.elapsed();
        Sample {
            ok: true,
            error: None,
            ttft: self.first.map_or(e2e, |f| f - self.t0),
            e2e,
            output_tokens: reported_tokens.unwrap_or(self.tokens).max(self.tokens.min(1)),
            prompt_tokens,
            cached_tokens,
            itl: self.itl,
            ..Sample::default()
        }
    }
}

impl Client {
    /// `target`: `host:port` or `http://host:port`. `api`: `grpc` or `openai`.
    pub async fn connect(target: &str, api: &str, model: Option<String>, key: Option<String>) -> Result<Client> {
        let url = if target.contains("://") { target.to_string() } else { format!("http://{target}") };
        match api {
            "grpc" => {
                let client =
                    GenerateClient::connect(url.clone()).await.with_context(|| format!("connecting to {url}"))?;
                Ok(Client::Grpc { client, key })
            }
            "openai" => {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
                let base = format!("{}/v1", url.trim_end_matches('/').trim_end_matches("/v1"));
                let model = match model {
                    Some(m) => m,
                    None => {
                        // The server's first model, as most servers serve one.
                        let mut req = http.get(format!("{base}/models"));
                        if let Some(k) = &key {
                            req = req.bearer_auth(k);
                        }
                        let v: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
                        v["data"][0]["id"].as_str().ok_or_else(|| anyhow!("{base}/models lists no model"))?.to_string()
                    }
                };
                Ok(Client::OpenAi { http, base, model, key })
            }
            other => Err(anyhow!("--api {other:?}: expected grpc or openai")),
        }
    }

    pub async fn send(&self, item: &Item) -> Sample {
        let r = match self {
            Client::Grpc { client, key } => grpc(client.clone(), key.as_deref(), item).await,
            Client::OpenAi { http, base, model, key } => openai(http, base, model, key.as_deref(), item).await,
        };
        r.unwrap_or_else(|e| {
            let refused = e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::ResourceExhausted)
                || format!("{e}").starts_with("HTTP 429");
            Sample { ok: false, refused, error: Some(format!("{e:#}")), ..Sample::default() }
        })
    }
}

async fn grpc(mut c: GenerateClient<Channel>, key: Option<&str>, item: &Item) -> Result<Sample> {
    let input = match &item.tokens {
        Some(ids) => api::generate_request::Input::PromptTokens(api::PromptTokens { token_ids: ids.clone() }),
        None => {
            let messages = item.messages.iter().map(|(role, content)| api::ChatMessage {
                role: role.clone(),
                content: content.clone(),
                ..Default::default()
            });
            api::generate_request::Input::Messages(api::Messages { messages: messages.collect(), tools: vec![] })
        }
    };
    let mut req = tonic::Request::new(api::GenerateRequest {
        input: Some(input),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(item.output_len),
            ignore_eos: !item.natural,
            ..Default::default()
        }),
        slo_ttft_ms: item.slo_ttft_ms,
        expected_output_tokens: item.expected_output,
        ..Default::default()
    });
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse()?);
    }
    let mut clock = Clock::new();
    let mut s = c.generate_stream(req).await?.into_inner();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    while let Some(m) = s.message().await? {
        clock.tokens(m.token_ids.len());
        if let Some(u) = m.usage {
            prompt_tokens = u.prompt_tokens as usize;
            cached_tokens = u.cached_tokens as usize;
        }
    }
    Ok(clock.done(prompt_tokens, cached_tokens, None))
}

async fn openai(http: &reqwest::Client, base: &str, model: &str, key: Option<&str>, item: &Item) -> Result<Sample> {
    let messages: Vec<serde_json::Value> =
        item.messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
    let body = serde_json::json!({
        "model": model, "messages": messages, "max_tokens": item.output_len, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
        // vLLM, llama.cpp and Tandem all take this extension.
        "ignore_eos": !item.natural,
    });
    let mut req = http.post(format!("{base}/chat/completions")).json(&body);
    if let Some(ms) = item.slo_ttft_ms {
        req = req.header("x-slo-ttft-ms", ms.to_string());
    }
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let mut clock = Clock::new();
    let mut resp = req.send().await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(anyhow!("HTTP {status}: {}", resp.text().await.unwrap_or_default()));
    }
    let (mut buf, mut usage) = (Vec::new(), None);
    while let Some(bytes) = resp.chunk().await? {
        buf.extend_from_slice(&bytes);
        // Server-sent events end with a blank line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data).context("an SSE event is not JSON")?;
                if let Some(e) = v.get("error") {
                    return Err(anyhow!("error event: {e}"));
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    usage = Some(u.clone());
                }
                let n = v["choices"].as_array().map_or(0, |cs| {
                    cs.iter().filter(|c| c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())).count()
                });
                clock.tokens(n);
            }
        }
    }
    let prompt = usage.as_ref().and_then(|u| u["prompt_tokens"].as_u64()).unwrap_or(0) as usize;
    let cached = usage.as_ref().and_then(|u| u["prompt_tokens_details"]["cached_tokens"].as_u64()).unwrap_or(0);
    let reported = usage.as_ref().and_then(|u| u["completion_tokens"].as_u64()).map(|x| x as usize);
    Ok(clock.done(prompt, cached as usize, reported))
}
