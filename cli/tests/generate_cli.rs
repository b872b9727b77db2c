//! `tandem generate` as a user runs it: the real binary, the real model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_path() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "model missing: run scripts/fetch-model.sh first");
    p
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem")).current_dir(root()).args(args).output().expect("runs tandem")
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "tandem failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "--json prints exactly one line: {stdout}");
    serde_json::from_str(&stdout).expect("stdout is one JSON object")
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// `tandem generate` on a fixture's input (`--prompt` or `--chat`), greedy, JSON out.
fn greedy_json(case: &Value, flag: &str, max_tokens: &str) -> Value {
    let input = case["input"].as_str().unwrap();
    json_of(&tandem(&["generate", flag, input, "--temperature", "0", "--max-tokens", max_tokens, "--json"]))
}

fn fixture_case(name: &str) -> Value {
    let p = root().join("tests/fixtures/llama_cpp/reference.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).expect("fixture case").clone()
}

/// Our greedy ids equal llama.cpp's until a step where llama.cpp rated our
/// token within 0.5 logits of its own pick (see engine/tests/model_reference.rs).
fn assert_matches_reference(case: &Value, got: &[u64]) {
    let want = ids(&case["generated_token_ids"]);
    let prompt_len = case["prompt_token_ids"].as_array().unwrap().len();
    for (step, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if g != w {
            let row = case["top5"][prompt_len - 1 + step].as_array().unwrap();
            let best = row[0][1].as_f64().unwrap();
            let ours = row.iter().find(|e| e[0].as_u64() == Some(g)).map(|e| best - e[1].as_f64().unwrap());
            assert!(ours.is_some_and(|b| b < 0.5), "step {step}: ours {g}, llama.cpp {w}, ours behind by {ours:?}");
            return;
        }
    }
    assert_eq!(got.len(), want.len(), "same length when every token matched");
}

#[test]
fn greedy_raw_prompt_matches_llama_cpp() {
    model_path();
    let case = fixture_case("arithmetic");
    let v = greedy_json(&case, "--prompt", "64");
    assert_eq!(ids(&v["prompt_token_ids"]), ids(&case["prompt_token_ids"]));
    assert_matches_reference(&case, &ids(&v["token_ids"]));
    assert!(v["finish_reason"] == "length" || v["finish_reason"] == "stop");
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn greedy_chat_applies_the_template_and_matches_llama_cpp() {
    model_path();
    let case = fixture_case("list-fruits");
    let v = greedy_json(&case, "--chat", "64");
    assert_eq!(
        ids(&v["prompt_token_ids"]),
        ids(&case["prompt_token_ids"]),
        "chat template + tokenizer equal llama.cpp's"
    );
    assert_matches_reference(&case, &ids(&v["token_ids"]));
}

#[test]
fn eos_ends_generation_with_stop() {
    // german-weather ends with EOS after 25 tokens in llama.cpp.
    let case = fixture_case("german-weather");
    assert_eq!(case["finish_reason"], "stop");
    let v = greedy_json(&case, "--chat", "200");
    let got = ids(&v["token_ids"]);
    if got == ids(&case["generated_token_ids"]) {
        assert_eq!(v["finish_reason"], "stop");
        assert!(!got.contains(&2), "EOS is not part of token_ids");
    } else {
        assert_matches_reference(&case, &got);
    }
}

#[test]
fn same_seed_same_output_and_max_tokens_is_respected() {
    let args = [
        "generate",
        "--chat",
        "Write a poem about rivers.",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "7",
        "--max-tokens",
        "24",
        "--json",
    ];
    let a = json_of(&tandem(&args));
    let b = json_of(&tandem(&args));
    assert_eq!(a, b);
    assert!(ids(&a["token_ids"]).len() <= 24);
    let mut other = args.to_vec();
    other[8] = "8";
    let c = json_of(&tandem(&other));
    assert_ne!(a["token_ids"], c["token_ids"], "a different seed gives a different sample");
}

#[test]
fn streaming_text_equals_json_text() {
    let common = ["--prompt", "The three primary colors are", "--temperature", "0", "--max-tokens", "20"];
    let streamed = tandem(&[&["generate"], &common[..]].concat());
    assert!(streamed.status.success());
    let v = json_of(&tandem(&[&["generate"], &common[..], &["--json"]].concat()));
    assert_eq!(String::from_utf8(streamed.stdout).unwrap().trim_end_matches('\n'), v["text"].as_str().unwrap());
}

fn expect_error(args: &[&str], needle: &str) {
    let out = tandem(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error for {args:?}: {err}");
    assert!(err.to_lowercase().contains(needle), "{args:?}: expected '{needle}' in: {err}");
    assert!(out.stdout.is_empty(), "nothing on stdout for {args:?}");
}

fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A GGUF whose embedding is Q3_K, a type this engine does not implement.
fn gguf_with_q3k() -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let kv: [(&str, u32); 6] = [
        ("llama.block_count", 1),
        ("llama.embedding_length", 256),
        ("llama.feed_forward_length", 256),
        ("llama.attention.head_count", 4),
        ("llama.context_length", 64),
        ("llama.vocab_size", 4),
    ];
    b.extend((kv.len() as u64 + 1).to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    for (k, v) in kv {
        s(&mut b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(11u32.to_le_bytes()); // Q3_K
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 4 * 110]);
    b
}

#[test]
fn bad_input_is_a_one_line_error() {
    let model = model_path();
    let full = std::fs::read(&model).unwrap();
    let truncated = scratch_file("truncated.gguf", &full[..3 << 20]);
    let not_gguf = scratch_file("notes.gguf", b"this is not a model\n");
    let q3k = scratch_file("q3k.gguf", &gguf_with_q3k());
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let long_prompt = "hello ".repeat(9000);
    expect_error(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "does not exist");
    expect_error(&["generate", "--model", &p(&not_gguf), "--prompt", "hi"], "not a gguf");
    expect_error(&["generate", "--model", &p(&truncated), "--prompt", "hi"], "truncated");
    expect_error(&["generate", "--model", &p(&q3k), "--prompt", "hi"], "q3_k");
    expect_error(&["generate", "--prompt", ""], "empty");
    expect_error(&["generate", "--prompt", &long_prompt], "context");
    expect_error(&["generate", "--prompt", "hi", "--max-tokens", "0"], "max-tokens");
    expect_error(&["generate", "--prompt", "hi", "--temperature", "-1"], "temperature");
    expect_error(&["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p");
}

/// The other kernel families and cache settings give the same greedy text, up to near-ties.
#[test]
fn scalar_and_avx2_kernels_f32_cache_and_odd_block_size_agree_with_llama_cpp() {
    model_path();
    let case = fixture_case("counting");
    for extra in [["--isa", "scalar", "--kv-dtype", "f32"], ["--isa", "avx2", "--block-size", "7"]] {
        let mut args = vec![
            "generate",
            "--prompt",
            case["input"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--json",
        ];
        args.extend(extra);
        let v = json_of(&tandem(&args));
        let want: Vec<u64> = ids(&case["generated_token_ids"]).into_iter().take(32).collect();
        let got = ids(&v["token_ids"]);
        let mut case32 = case.clone();
        case32["generated_token_ids"] = serde_json::json!(want);
        assert_matches_reference(&case32, &got);
    }
}

#[test]
fn n_choices_share_a_prompt_and_repeated_prompts_share_the_cache() {
    let out = tandem(&[
        "generate",
        "--chat",
        "Name a fruit.",
        "--n",
        "3",
        "--temperature",
        "1.0",
        "--seed",
        "5",
        "--max-tokens",
        "8",
        "--json",
    ]);
    let v = json_of(&out);
    let choices = v["choices"].as_array().expect("a list of choices for --n 3");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(ids(&c["token_ids"]).len() <= 8);
        assert!(c["finish_reason"] == "stop" || c["finish_reason"] == "length");
    }
    assert!(!ids(&v["prompt_token_ids"]).is_empty());

    // Two prompts in one run: one JSON line each, the second identical to a run of its own.
    let two = tandem(&[
        "generate",
        "--prompt",
        "The sky is",
        "--prompt",
        "The sea is",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(two.status.success());
    let lines: Vec<Value> =
        String::from_utf8(two.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let alone =
        json_of(&tandem(&["generate", "--prompt", "The sea is", "--temperature", "0", "--max-tokens", "8", "--json"]));
    assert_eq!(lines[1], alone);
}

#[test]
fn offline_bench_reports_its_figures() {
    let out = tandem(&[
        "bench",
        "engine",
        "--offline",
        "--requests",
        "6",
        "--input-len",
        "40",
        "--output-len",
        "3",
        "--shared-prefix-len",
        "32",
        "--max-batched-tokens",
        "40",
        "--json",
    ]);
    let v = json_of(&out);
    for key in ["requests_per_s", "output_tok_s", "total_tok_s", "kv_waste", "prefix_hit_rate", "preemptions"] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    // With one prompt per step at first, the other 5 requests reuse the first one's
    // 32-token shared prefix (2 blocks of 16). (Requests admitted in the same step
    // cannot hit each other: the blocks are registered after they are computed.)
    assert_eq!(v["prefix_hit_rate"].as_f64().unwrap(), (5.0 * 32.0) / (6.0 * 40.0));
}
