//! The OpenAI-compatible HTTP API of `tessera run`, over real sockets: reference outputs for
//! chat and completions (streamed and not), stop strings, every error status, a client that
//! hangs up mid-stream, and 16 concurrent streams batched together.

mod common;

use common::http::{get, post, read_response, request, send};
use common::{reference, smollm2, tessera};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `tessera run` (or `tessera coordinator`) process serving HTTP, killed when dropped.
struct Server {
    child: Child,
    http: String,
    grpc: String,
    token: String,
    model: String,
    lines: mpsc::Receiver<String>,
    /// What it said so far (for a failure's message).
    seen: Vec<String>,
}

impl Server {
    /// Starts `cmd` (whose gRPC listener is on port 0: the address comes from its log, so
    /// that no port picked in advance can be taken meanwhile by another test).
    fn spawn(mut cmd: Command, token: &str, wait_ready: bool) -> Server {
        let mut child = cmd
            .env("TESSERA_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tessera");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut s = Server {
            child,
            http: String::new(),
            grpc: String::new(),
            token: token.into(),
            model: String::new(),
            lines,
            seen: Vec::new(),
        };
        s.http = s
            .wait_line("HTTP API on http://")
            .split("http://")
            .nth(1)
            .unwrap()
            .trim_end_matches("/v1")
            .to_string();
        // "coordinator listening on ADDR, ..." or (`tessera run`) "coordinator on ADDR: ...";
        // the workers' lines share the stream, so only a line that starts so and names an
        // address counts (a CI run once took another line for it).
        s.grpc = loop {
            let l = s.wait_line("coordinator ");
            let addr = Some(&l[..])
                .filter(|l| l.starts_with("coordinator "))
                .and_then(|r| r.split(" on ").nth(1))
                .and_then(|r| r.split([',', ' ']).next())
                .map(|a| a.trim_end_matches(':'))
                .filter(|a| a.parse::<std::net::SocketAddr>().is_ok());
            if let Some(a) = addr {
                break a.to_string();
            }
        };
        if wait_ready {
            s.wait_line("serving on");
        }
        let models = get(&s.http, "/v1/models");
        assert_eq!(models.status, 200, "{}", models.body);
        s.model = models.json()["data"][0]["id"].as_str().unwrap().to_string();
        s
    }

    /// `tessera run` with SmolLM2 on two worker processes.
    fn run(extra: &[&str]) -> Server {
        let mut cmd = tessera();
        cmd.args(["run", "--model", smollm2().to_str().unwrap(), "--exact"])
            .args(["--workers", "2", "--listen", "127.0.0.1:0"])
            .args(["--http", "127.0.0.1:0"])
            .args(extra);
        Server::spawn(cmd, "http-test-token", true)
    }

    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => {
                    self.seen.push(l.clone());
                    return l;
                }
                Ok(l) => self.seen.push(l),
                Err(e) => panic!(
                    "no line with {needle:?} from tessera ({e}); it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn cluster(&self) -> Value {
        let r = get(&self.http, "/v1/cluster");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    fn metrics(&self) -> String {
        let r = get(&self.http, "/metrics");
        assert_eq!(r.status, 200);
        r.body
    }

    /// Waits until `f` holds for /v1/cluster.
    fn wait_cluster(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let c = self.cluster();
            if f(&c) {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{what}: {c:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled or labelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
}

/// Text and finish reason of a streamed answer; checks the stream's framing.
fn streamed(events: &[String], chat: bool) -> (String, String, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for (i, e) in events[..events.len() - 1].iter().enumerate() {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("event {e:?}"));
        assert!(v.get("error").is_none(), "{v}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            continue;
        }
        let c = &v["choices"][0];
        if chat {
            assert_eq!(v["object"], "chat.completion.chunk");
            if i == 0 {
                assert_eq!(c["delta"]["role"], "assistant");
            }
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        } else {
            text.push_str(c["text"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            assert!(finish.is_none(), "two finish reasons");
            finish = Some(f.to_string());
        }
    }
    (text, finish.expect("a finish reason"), usage)
}

#[test]
fn chat_and_completions_give_the_reference_text_streamed_or_not() {
    let r = reference("smollm2-135m-q4_1");
    let s = Server::run(&[]);
    let health = get(&s.http, "/health");
    assert_eq!(health.status, 200, "{}", health.body);

    // The workers hold the file's weights as stored, split: together the file's tensor bytes,
    // plus the 256-value super-blocks a row-parallel cut falls inside (both sides hold those),
    // and each one's resident memory is its share plus no more process overhead than the plan
    // allows for (the weights are not widened anywhere).
    let file = tessera_model::gguf::GgufFile::open(&smollm2()).unwrap();
    let tensor_bytes: u64 = file.tensors.values().map(|t| t.bytes() as u64).sum();
    let c = s.cluster();
    let workers = c["workers"].as_array().unwrap();
    let field = |w: &Value, k: &str| w[k].as_u64().unwrap_or_else(|| panic!("{k} in {w}"));
    let held: u64 = workers.iter().map(|w| field(w, "weight_bytes_held")).sum();
    assert!(
        held >= tensor_bytes && held <= tensor_bytes + tensor_bytes / 20,
        "workers hold {held} bytes of a file with {tensor_bytes} bytes of tensors: {c:#}"
    );
    // The exact path's KV cache is f32, on every worker.
    assert_eq!(c["kv_cache_type"], "f32", "{c:#}");
    assert_eq!(c["kv_bytes_per_position"], 2 * 30 * 3 * 64 * 4, "{c:#}");
    for w in workers {
        assert_eq!(w["kv_cache"], "f32", "{w}");
        let (h, rss) = (field(w, "weight_bytes_held"), field(w, "rss_bytes"));
        assert!(
            rss <= h + tessera_core::WORKER_OVERHEAD_BYTES,
            "a worker holding {h} bytes of weights is {rss} bytes resident: {w}"
        );
    }

    // Chat: the reference chat case, greedy. It ends with the end-of-turn token.
    let case = r.cases.iter().find(|c| c.messages.is_some()).unwrap();
    let want = case.greedy_text.as_deref().unwrap();
    let want = want.strip_suffix("<|im_end|>").expect("ends its turn");
    let body = json!({"model": s.model, "messages": case.messages, "temperature": 0,
                      "max_tokens": case.greedy_ids.len() + 20});
    let resp = post(&s.http, "/v1/chat/completions", &body);
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], case.input_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], case.greedy_ids.len());
    assert_eq!(
        v["usage"]["total_tokens"],
        case.input_ids.len() + case.greedy_ids.len()
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let resp = post(&s.http, "/v1/chat/completions", &sbody);
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (text, finish, usage) = streamed(&resp.events(), true);
    assert_eq!(text, want);
    assert_eq!(finish, "stop");
    assert_eq!(usage.unwrap(), v["usage"]);

    // Completions: a plain prompt, as long as the reference (which runs past end-of-text).
    let case = &r.cases[0];
    let want = case.greedy_text.as_deref().unwrap();
    let body = json!({"model": s.model, "prompt": case.prompt, "temperature": 0,
                      "max_tokens": case.greedy_ids.len(), "ignore_eos": true});
    let resp = post(&s.http, "/v1/completions", &body);
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], case.input_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], case.greedy_ids.len());
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (text, finish, usage) = streamed(&post(&s.http, "/v1/completions", &sbody).events(), false);
    assert_eq!((text.as_str(), finish.as_str()), (want, "length"));
    assert!(usage.is_none(), "usage only when asked for");

    // Stop strings cut exactly, also when they span tokens (" Paris" + "." and "\n" + "\n").
    for (stop, stream) in [
        ("\n\n", false),
        ("is.", false),
        ("is.", true),
        ("zzz", false),
    ] {
        let mut b = body.clone();
        b["stop"] = json!([stop]);
        b["stream"] = json!(stream);
        let resp = post(&s.http, "/v1/completions", &b);
        assert_eq!(resp.status, 200, "{}", resp.body);
        let (text, finish) = if stream {
            let (t, f, _) = streamed(&resp.events(), false);
            (t, f)
        } else {
            let v = resp.json();
            let c = &v["choices"][0];
            (
                c["text"].as_str().unwrap().to_string(),
                c["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        match want.find(stop) {
            Some(at) => {
                assert_eq!(text, want[..at], "stop {stop:?}");
                assert_eq!(finish, "stop");
            }
            None => assert_eq!((text.as_str(), finish.as_str()), (want, "length")),
        }
    }

    // `tessera chat` keeps a conversation through the gRPC API.
    let mut chat = tessera()
        .args(["chat", "--coordinator", &s.grpc, "--max-tokens", "60"])
        .env("TESSERA_TOKEN", &s.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let case = r.cases.iter().find(|c| c.messages.is_some()).unwrap();
    let question = case.messages.as_ref().unwrap()[0]["content"]
        .as_str()
        .unwrap();
    write!(
        chat.stdin.as_mut().unwrap(),
        "{question}\nAnd in two words?\n/exit\n"
    )
    .unwrap();
    let o = chat.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let first = case
        .greedy_text
        .as_deref()
        .unwrap()
        .strip_suffix("<|im_end|>")
        .unwrap();
    assert!(out.starts_with(first), "{out}");
    assert_eq!(
        err.matches("decode").count(),
        2,
        "two answers with their speed: {err}"
    );
}

#[test]
fn bad_requests_get_the_right_status_and_a_hung_up_stream_is_freed() {
    // 0.125 GiB of KV cache in f16 (chosen on the exact path): 5825 positions of SmolLM2's
    // (23040 bytes each), in the scheduler and on every worker.
    let s = Server::run(&[
        "--max-seqs",
        "1",
        "--max-queue",
        "1",
        "--kv-cache-gib",
        "0.125",
        "--kv-cache",
        "f16",
    ]);
    let c = s.cluster();
    assert_eq!(c["kv_cache_type"], "f16", "{c:#}");
    assert_eq!(c["scheduler"]["kv_budget_positions"], 5825, "{c:#}");
    let workers = c["workers"].as_array().unwrap();
    assert!(workers.iter().all(|w| w["kv_cache"] == "f16"), "{c:#}");
    let error = |resp: &common::http::Response, status: u16| -> Value {
        assert_eq!(resp.status, status, "{}", resp.body);
        let v = resp.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    };
    // Malformed JSON, and a known field of the wrong type.
    let e = error(
        &request(
            &s.http,
            "POST",
            "/v1/completions",
            Some(r#"{"prompt": "hi","#),
        ),
        400,
    );
    assert!(e["message"].as_str().unwrap().contains("JSON"), "{e}");
    // More tokens than the KV cache can ever hold: 400 naming both numbers, nothing runs.
    let e = error(
        &post(
            &s.http,
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 7000}),
        ),
        400,
    );
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("7000") && msg.contains("holds 5825"), "{e}");
    let e = error(
        &post(
            &s.http,
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": "many"}),
        ),
        400,
    );
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "{e}");
    let e = error(
        &post(
            &s.http,
            "/v1/chat/completions",
            &json!({"messages": "hello"}),
        ),
        400,
    );
    assert!(e["message"].as_str().unwrap().contains("messages"), "{e}");
    error(
        &post(&s.http, "/v1/completions", &json!({"prompt": "hi", "n": 2})),
        400,
    );
    // A 100 KB prompt: the error says how long it is and what the limit is.
    let long = "All work and no play makes Jack a dull boy. ".repeat(2300);
    assert!(long.len() > 100_000);
    let e = error(
        &post(
            &s.http,
            "/v1/completions",
            &json!({"prompt": long, "max_tokens": 4}),
        ),
        400,
    );
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("8192"), "{m}");
    assert!(
        m.split(|c: char| !c.is_ascii_digit())
            .any(|n| n.parse::<usize>().is_ok_and(|n| n > 20000)),
        "the prompt's length is missing: {m}"
    );
    assert_eq!(e["code"], "context_length_exceeded");
    // Unknown model, unknown path.
    let e = error(
        &post(
            &s.http,
            "/v1/completions",
            &json!({"model": "gpt-17", "prompt": "hi"}),
        ),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    error(&get(&s.http, "/v1/nothing-here"), 404);

    // One sequence at a time and one waiting: a third request is refused with 429.
    let long = json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 4000,
                      "ignore_eos": true, "stream": true, "temperature": 0});
    let mut first = send(&s.http, "POST", "/v1/completions", Some(&long.to_string()));
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.wait_cluster("the first stream decodes", |c| {
        c["scheduler"]["active_sequences"] == 1
            && c["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["kv_cached_sequences"] == 1)
    });
    let second = send(&s.http, "POST", "/v1/completions", Some(&long.to_string()));
    s.wait_cluster("the second waits", |c| c["scheduler"]["queued"] == 1);
    let e = error(&post(&s.http, "/v1/completions", &long), 429);
    assert_eq!(e["code"], "queue_full");

    // The first client hangs up mid-stream: its sequence leaves, the second one takes the slot.
    first.write_all(b"").ok();
    drop(first);
    s.wait_cluster("the waiting request is admitted", |c| {
        c["scheduler"]["queued"] == 0 && c["scheduler"]["active_sequences"] == 1
    });
    drop(second);
    // Both gone: no sequence left and no KV cache on any worker.
    let c = s.wait_cluster("every cache freed", |c| {
        c["scheduler"]["active_sequences"] == 0
            && c["scheduler"]["kv_reserved_positions"] == 0
            && c["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["kv_cached_sequences"] == 0 && w["kv_cached_positions"] == 0)
    });
    assert_eq!(c["workers"].as_array().unwrap().len(), 2);
    let m = s.metrics();
    assert_eq!(
        sample(&m, "tessera_requests_finished_total{outcome=\"cancelled\"}"),
        2.0
    );
    assert_eq!(
        sample(&m, "tessera_requests_rejected_total{reason=\"queue_full\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "tessera_http_responses_total{code=\"429\"}"),
        1.0
    );
    assert_eq!(sample(&m, "tessera_worker_up{worker=\"worker-0\"}"), 1.0);
    assert_eq!(sample(&m, "tessera_worker_up{worker=\"worker-1\"}"), 1.0);
    assert_eq!(sample(&m, "tessera_queue_depth"), 0.0);
    assert!(sample(&m, "tessera_generated_tokens_total") > 0.0);
    assert!(sample(&m, "tessera_decode_tokens_per_second") > 0.0);
    assert!(sample(&m, "tessera_allreduce_seconds_count") > 0.0);

    // The cluster still answers.
    let ok = post(
        &s.http,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["usage"]["completion_tokens"], 3);
}

#[test]
fn a_cluster_that_is_not_ready_answers_503() {
    // A coordinator waiting for a worker that never comes.
    let mut cmd = tessera();
    cmd.args(["coordinator", "--model", smollm2().to_str().unwrap()])
        .args(["--workers", "1", "--listen", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0"]);
    let s = Server::spawn(cmd, "t", false);
    let h = get(&s.http, "/health");
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(h.json()["state"], "waiting for workers");
    let r = post(&s.http, "/v1/completions", &json!({"prompt": "hi"}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "cluster_unavailable");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("waiting for workers")
    );
    assert_eq!(sample(&s.metrics(), "tessera_cluster_ready"), 0.0);
    assert_eq!(s.cluster()["ready"], false);
}

#[test]
fn sixteen_concurrent_streams_each_get_their_own_greedy_text() {
    let s = Server::run(&[]);
    let prompts: Vec<String> = (0..16)
        .map(|i| {
            let topics = [
                "the sea",
                "a robot",
                "bread",
                "winter",
                "music",
                "a cat",
                "mountains",
                "the moon",
            ];
            // Long enough (about 60 tokens each) that the joining prompts fill 512-token
            // prefill steps, whose all-reduces are megabyte bursts over QUIC.
            format!(
                "You are a careful writer. Every answer is short, concrete and friendly, and it \
                 never repeats the question. Think of a detail that a reader would not expect. \
                 Question {i}: write one sentence about {}.",
                topics[i % topics.len()]
            )
        })
        .collect();
    let body = |p: &str, stream: bool| {
        json!({"model": s.model, "prompt": p, "max_tokens": 12, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    // Each alone first.
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let r = post(&s.http, "/v1/completions", &body(p, false));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    // Then all sixteen at once, streamed.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(prompts.len()));
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (http, b, barrier) = (s.http.clone(), body(p, true), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = read_response(send(&http, "POST", "/v1/completions", Some(&b.to_string())));
                assert_eq!(r.status, 200, "{}", r.body);
                streamed(&r.events(), false)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (text, finish, _) = h.join().unwrap();
        assert_eq!(text, alone[i], "stream {i}: {:?}", prompts[i]);
        assert_eq!(finish, "length");
    }
    let m = s.metrics();
    assert!(
        sample(&m, "tessera_max_step_batch") >= 4.0,
        "the streams did not share steps:\n{m}"
    );
    assert_eq!(
        sample(&m, "tessera_requests_finished_total{outcome=\"completed\"}"),
        32.0
    );
    // The latency histograms saw every request: 32 first tokens, 32 x 11 gaps between tokens,
    // 32 completions; their buckets add up and their quantiles are in order.
    for (name, n) in [
        ("tessera_time_to_first_token_seconds", 32.0),
        ("tessera_time_per_output_token_seconds", 32.0 * 11.0),
        ("tessera_e2e_request_latency_seconds", 32.0),
    ] {
        assert_eq!(sample(&m, &format!("{name}_count")), n, "{name}:\n{m}");
        let (p50, p99) = (quantile(&m, name, 0.5), quantile(&m, name, 0.99));
        assert!(0.0 < p50 && p50 <= p99, "{name}: p50 {p50}, p99 {p99}");
        eprintln!("{name}: p50 <= {p50} s, p99 <= {p99} s");
    }
    assert!(sample(&m, "tessera_step_seconds_count") > 0.0);
    assert_eq!(sample(&m, "tessera_generated_tokens_total"), 32.0 * 12.0);
}

/// The upper bound of the bucket that holds quantile `q` of a histogram in `metrics`, checking
/// that its buckets are cumulative and end at its count.
fn quantile(metrics: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, v) = rest.split_once("\"} ").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, v.parse().unwrap())
        })
        .collect();
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    let count = sample(metrics, &format!("{name}_count"));
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    buckets.iter().find(|b| b.1 >= q * count).unwrap().0
}

/// OpenAI's `logprobs`, from the workers' candidates and their slices' log-sum-exp: the top 5
/// of each greedy step are transformers' top 5 (ids in order, gaps between logprobs equal to
/// the reference logits' gaps), the drawn token's logprob is the best one, and chat's
/// per-token list streams the same entries as it answers whole.
#[test]
fn logprobs_come_from_the_workers_candidates() {
    let reference_file: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("smollm2-135m-q4_1/reference.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &reference_file["cases"][0];
    let s = Server::run(&[]);
    let tok = tessera_model::Tokenizer::from_gguf(
        &tessera_model::gguf::GgufFile::open(&smollm2()).unwrap(),
    )
    .unwrap();
    let steps = 4;
    let body = json!({"model": s.model, "prompt": case["prompt"], "temperature": 0,
                      "max_tokens": steps, "ignore_eos": true, "logprobs": 5});
    let resp = post(&s.http, "/v1/completions", &body);
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), steps, "{lp}");
    let mut offset = 0;
    for step in 0..steps {
        let want = case["step_logits_top"][step].as_array().unwrap();
        let top = lp["top_logprobs"][step].as_object().unwrap();
        assert_eq!(top.len(), 5, "{lp}");
        // An object has no order: best first by value.
        let mut got: Vec<(&String, f64)> =
            top.iter().map(|(k, x)| (k, x.as_f64().unwrap())).collect();
        got.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (j, w) in want.iter().enumerate() {
            let id = w[0].as_u64().unwrap() as u32;
            assert_eq!(
                got[j].0,
                &tok.decode_tail(&[id]).unwrap(),
                "step {step}, rank {j}"
            );
            let gap = got[0].1 - got[j].1;
            let ref_gap = want[0][1].as_f64().unwrap() - w[1].as_f64().unwrap();
            assert!(
                (gap - ref_gap).abs() < 0.04,
                "step {step}: gap {gap} vs {ref_gap}"
            );
        }
        assert!(got[0].1 <= 0.0 && got.iter().map(|g| g.1.exp()).sum::<f64>() <= 1.0 + 1e-4);
        assert_eq!(lp["token_logprobs"][step].as_f64().unwrap(), got[0].1);
        assert_eq!(lp["tokens"][step].as_str().unwrap(), got[0].0);
        assert_eq!(lp["text_offset"][step], offset);
        offset += got[0].0.chars().count();
    }
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        v["choices"][0]["text"].as_str().unwrap()
    );

    // The gRPC Generate stream carries the same numbers.
    let grpc = grpc_tokens(&s, case["prompt"].as_str().unwrap(), steps as u32, 5).unwrap();
    assert_eq!(grpc.len(), steps, "{grpc:?}");
    for (step, t) in grpc.iter().enumerate() {
        let want = case["step_logits_top"][step].as_array().unwrap();
        let ids: Vec<u64> = t.top.iter().map(|a| a.id as u64).collect();
        let ref_ids: Vec<u64> = want.iter().map(|w| w[0].as_u64().unwrap()).collect();
        assert_eq!(ids, ref_ids, "step {step}");
        assert_eq!(t.id, t.top[0].id, "greedy draws the best");
        let http = lp["token_logprobs"][step].as_f64().unwrap();
        assert!(
            (t.logprob.unwrap() as f64 - http).abs() < 1e-6,
            "step {step}"
        );
        for a in &t.top {
            let http = lp["top_logprobs"][step][&a.text].as_f64().unwrap();
            assert!((a.logprob as f64 - http).abs() < 1e-6, "step {step}: {a:?}");
        }
    }
    // Without logprobs none are sent; too many alternatives: InvalidArgument.
    let plain = grpc_tokens_with(&s, "Hi", 2, None).unwrap();
    assert!(
        plain
            .iter()
            .all(|t| t.logprob.is_none() && t.top.is_empty())
    );
    let err = grpc_tokens(&s, "Hi", 2, 21).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // Chat: logprobs true and 3 alternatives, whole and streamed.
    let body = json!({"model": s.model, "messages": [{"role": "user", "content": "Hi!"}],
                      "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3});
    let whole = post(&s.http, "/v1/chat/completions", &body).json();
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len(),
        whole["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    for e in &content {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3, "{e}");
        assert_eq!(e["top_logprobs"][0]["logprob"], e["logprob"], "{e}");
    }
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = post(&s.http, "/v1/chat/completions", &sbody).events();
    let mut streamed = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    assert_eq!(streamed, content);
    // Out of range, or alternatives without logprobs: 400.
    for bad in [
        json!({"prompt": "x", "logprobs": 6}),
        json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
        json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    ] {
        let path = if bad.get("prompt").is_some() {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let r = post(&s.http, path, &bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}

/// The tokens of a greedy gRPC Generate stream asking for `k` alternatives per token.
fn grpc_tokens(
    s: &Server,
    prompt: &str,
    max_tokens: u32,
    k: u32,
) -> Result<Vec<tessera_proto::Token>, tonic::Status> {
    grpc_tokens_with(s, prompt, max_tokens, Some(k))
}

fn grpc_tokens_with(
    s: &Server,
    prompt: &str,
    max_tokens: u32,
    logprobs: Option<u32>,
) -> Result<Vec<tessera_proto::Token>, tonic::Status> {
    use tessera_proto::{GenerateRequest, coordinator_client::CoordinatorClient, generate_event};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // TLS trusted from the cluster token, as every gRPC client of the cluster.
        let keys = tessera_proto::secure::ClusterKeys::from_secret(&s.token).unwrap();
        let mut client = CoordinatorClient::new(
            keys.channel(&s.grpc, |e| e)
                .await
                .expect("connect to the coordinator"),
        );
        let req = GenerateRequest {
            prompt: prompt.into(),
            max_tokens,
            ignore_eos: true,
            logprobs,
            ..Default::default()
        };
        let mut stream = client.generate(keys.request(req)).await?.into_inner();
        let mut tokens = Vec::new();
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(generate_event::Event::Token(t)) => tokens.push(t),
                Some(generate_event::Event::Done(_)) | None => {}
            }
        }
        Ok(tokens)
    })
}

/// Mutated request bodies (completions and chat, streamed or not, with sampling, logprobs,
/// stop strings and token-id prompts) get an answer or a 4xx with an OpenAI-style error: never
/// a 5xx or a dropped connection; and the server still answers a plain request afterwards.
#[test]
fn mutated_request_bodies_get_an_answer_or_a_client_error() {
    use common::mutate::{apply, cases, fuzz, json_edits};
    // A small KV cache bounds whatever max_tokens a mutation makes: 1165 positions.
    let s = Server::run(&["--kv-cache-gib", "0.05"]);
    let seeds: Vec<(&str, String)> = [
        (
            "/v1/completions",
            json!({"model": s.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0.7,
                   "top_p": 0.9, "seed": 3, "logprobs": 2, "stop": ["."]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": s.model, "messages": [{"role": "user", "content": "Hi!"}],
                   "max_tokens": 4, "stream": true, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 3], "max_tokens": 3, "stream": true, "ignore_eos": true}),
        ),
    ]
    .into_iter()
    .map(|(p, b)| (p, b.to_string()))
    .collect();
    let longest = seeds.iter().map(|(_, b)| b.len()).max().unwrap();
    let strategy = (0..seeds.len(), json_edits(longest));
    fuzz(file!(), "http", cases(48), strategy, 0.1, |(i, e)| {
        let (path, body) = &seeds[i];
        let body = String::from_utf8(apply(body.as_bytes().to_vec(), &e)).unwrap();
        let r = request(&s.http, "POST", path, Some(&body));
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "{body}: {} {}",
            r.status,
            r.body
        );
        if r.status != 200 {
            let v = r.json();
            assert!(v["error"]["message"].is_string(), "{body}: {v}");
        }
        r.status == 200
    });
    let ok = post(
        &s.http,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(get(&s.http, "/metrics").status, 200);
}

/// One streamed completion, read as it arrives: its text, finish reason, usage, and when
/// each token came.
struct Streamed {
    text: String,
    finish: String,
    usage: Value,
    token_times: Vec<Instant>,
}

/// Streams `body` (a completion request) and collects it; `tokens` is told of each token.
fn stream_completion(http: &str, body: &Value, mut tokens: impl FnMut(usize)) -> Streamed {
    let s = send(http, "POST", "/v1/completions", Some(&body.to_string()));
    let mut events = Vec::new();
    let mut token_times = Vec::new();
    let status = common::http::stream_events(s, |e| {
        if let Ok(v) = serde_json::from_str::<Value>(&e)
            && v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        {
            token_times.push(Instant::now());
            tokens(token_times.len());
        }
        events.push(e);
    });
    assert_eq!(status, 200, "{events:?}");
    let (text, finish, usage) = streamed(&events, false);
    Streamed {
        text,
        finish,
        usage: usage.expect("usage"),
        token_times,
    }
}

#[test]
fn a_worker_killed_mid_stream_costs_a_delay_not_an_error() {
    // A coordinator asked for 2 workers, and 3 worker processes: one waits as a stand-by.
    let token = "survival-test-token";
    let mut cmd = tessera();
    cmd.args([
        "coordinator",
        "--model",
        smollm2().to_str().unwrap(),
        "--exact",
    ])
    .args(["--workers", "2", "--listen", "127.0.0.1:0"])
    .args(["--http", "127.0.0.1:0"]);
    let s = Server::spawn(cmd, token, false);
    let grpc = s.grpc.clone();
    let worker = |name: &str| -> Child {
        common::worker_cmd(&grpc, token, name, "4", "127.0.0.1:0")
            .args(["--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut workers: std::collections::BTreeMap<String, Child> = ["w0", "w1", "w2"]
        .iter()
        .map(|n| (n.to_string(), worker(n)))
        .collect();
    let ready_names = |c: &Value| -> Vec<String> {
        c["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect()
    };
    let serving = |n: usize| move |c: &Value| c["ready"] == true && ready_names(c).len() == n;
    s.wait_cluster("two of three workers serving", serving(2));

    let n_tok = 40;
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                json!({"temperature": 0})
            } else {
                json!({"temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 100 + i})
            };
            let mut b = json!({"model": s.model, "max_tokens": n_tok, "ignore_eos": true,
                               "stream": true, "stream_options": {"include_usage": true},
                               "prompt": format!("Story {i}: once upon a time, in a town by the sea,")});
            b.as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            b
        })
        .collect();
    // The undisturbed run: the single stream alone, then the eight together.
    let undisturbed_one = stream_completion(&s.http, &bodies[0], |_| {});
    let run_all = |on_token: std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>| {
        let handles: Vec<_> = bodies
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, b)| {
                let (http, f) = (s.http.clone(), on_token.clone());
                std::thread::spawn(move || stream_completion(&http, &b, |n| f(i, n)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<Streamed>>()
    };
    let undisturbed = run_all(std::sync::Arc::new(|_, _| {}));
    for u in undisturbed.iter().chain([&undisturbed_one]) {
        assert_eq!(u.finish, "length");
        assert_eq!(u.usage["completion_tokens"], n_tok);
    }

    // Kills a worker of the serving mesh (SIGKILL) and says which, and when.
    let http = s.http.clone();
    let kill_one_serving = move |workers: &mut std::collections::BTreeMap<String, Child>| {
        let name = ready_names(&get(&http, "/v1/cluster").json())[0].clone();
        let mut victim = workers.remove(&name).unwrap();
        victim.kill().unwrap();
        victim.wait().unwrap();
        (name, Instant::now())
    };
    let check = |got: &Streamed, want: &Streamed, killed_at: Instant, what: &str| {
        assert_eq!(got.text, want.text, "{what}: the text changed");
        assert_eq!(got.finish, "length", "{what}");
        assert_eq!(got.usage, want.usage, "{what}: usage");
        assert!(
            *got.token_times.last().unwrap() > killed_at,
            "{what}: every token came before the kill"
        );
    };

    // A worker of the serving mesh killed while one greedy stream runs (after its 6th token),
    // or while eight run (after each one's 4th): every stream keeps the undisturbed text.
    let one_stream_and_a_kill =
        |workers: &mut std::collections::BTreeMap<String, Child>, what: &str| -> String {
            let (tx, rx) = mpsc::channel();
            let (http, b) = (s.http.clone(), bodies[0].clone());
            let one = std::thread::spawn(move || {
                stream_completion(&http, &b, |n| {
                    if n == 6 {
                        let _ = tx.send(());
                    }
                })
            });
            rx.recv_timeout(Duration::from_secs(120)).unwrap();
            let (victim, killed_at) = kill_one_serving(workers);
            check(&one.join().unwrap(), &undisturbed_one, killed_at, what);
            victim
        };
    let eight_streams_and_a_kill = |workers: &mut std::collections::BTreeMap<String, Child>,
                                    what: &str| {
        let (tx, rx) = mpsc::channel::<usize>();
        let tx = std::sync::Mutex::new(tx);
        let on_token = std::sync::Arc::new(move |i: usize, n: usize| {
            if n == 4 {
                let _ = tx.lock().unwrap().send(i);
            }
        });
        let kill = &kill_one_serving;
        std::thread::scope(|sc| {
            let killer = sc.spawn(move || {
                for _ in 0..8 {
                    rx.recv_timeout(Duration::from_secs(120)).unwrap();
                }
                kill(workers).1
            });
            let got = run_all(on_token);
            let killed_at = killer.join().unwrap();
            for (i, (g, u)) in got.iter().zip(&undisturbed).enumerate() {
                check(g, u, killed_at, &format!("stream {i} of 8, {what}"));
            }
        });
    };

    // (a) One greedy stream; the stand-by takes the dead worker's place.
    let victim = one_stream_and_a_kill(&mut workers, "one stream, stand-by");
    let c = s.wait_cluster("the stand-by serving", serving(2));
    assert!(!ready_names(&c).contains(&victim), "{c:#}");
    let m = s.metrics();
    assert_eq!(sample(&m, "tessera_recoveries_total"), 1.0, "{m}");
    assert_eq!(sample(&m, "tessera_replayed_sequences_total"), 1.0, "{m}");

    // (b) Eight streams at once, greedy and seeded; no stand-by is left, so the cluster
    // reshards over the one worker that remains.
    eight_streams_and_a_kill(&mut workers, "resharded");
    let c = s.wait_cluster("resharded over one", serving(1));
    let m = s.metrics();
    assert_eq!(sample(&m, "tessera_recoveries_total"), 2.0, "{m}\n{c:#}");
    assert_eq!(sample(&m, "tessera_replayed_sequences_total"), 9.0, "{m}");
    assert_eq!(sample(&m, "tessera_recovery_seconds_count"), 2.0, "{m}");
    eprintln!(
        "two recoveries (stand-by, then resharding over one) took {:.2} s in all",
        sample(&m, "tessera_recovery_seconds_sum")
    );
    assert_eq!(
        sample(&m, "tessera_requests_finished_total{outcome=\"failed\"}"),
        0.0
    );

    // A worker joins again: the cluster goes back to its full size, and answers the same.
    workers.insert("w3".into(), worker("w3"));
    s.wait_cluster("back to two workers", serving(2));
    let again = stream_completion(&s.http, &bodies[0], |_| {});
    assert_eq!(again.text, undisturbed_one.text);

    // The other two cases: (a) one stream with no stand-by (resharded over one), then, with
    // two more workers (back to two, one standing by), (b) eight streams onto the stand-by.
    one_stream_and_a_kill(&mut workers, "one stream, resharded");
    s.wait_cluster("resharded over one again", serving(1));
    workers.insert("w4".into(), worker("w4"));
    s.wait_cluster("back to two workers again", serving(2));
    workers.insert("w5".into(), worker("w5"));
    s.wait_cluster("a stand-by registered", |c: &Value| {
        c["workers"].as_array().unwrap().len() >= 3 && ready_names(c).len() == 2
    });
    eight_streams_and_a_kill(&mut workers, "stand-by");
    let c = s.wait_cluster("the stand-by serving", serving(2));
    assert!(ready_names(&c).contains(&"w5".to_string()), "{c:#}");
    let m = s.metrics();
    assert_eq!(sample(&m, "tessera_recoveries_total"), 4.0, "{m}");
    assert_eq!(
        sample(&m, "tessera_requests_finished_total{outcome=\"failed\"}"),
        0.0
    );
    for (_, mut w) in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

/// A TCP connection whose receive buffer is 4 KiB: a client that never reads fills it fast.
fn tiny_buffer_connection(addr: &str) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let addr: std::net::SocketAddrV4 = addr.parse().unwrap();
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// The HTTP server under load: 64 concurrent streaming clients, alone and then beside 16
/// slow ones (6 that send their headers a byte at a time, 5 whose body never finishes, 5 that
/// do not read their stream until it is over, 3 of those with a 4 KiB receive buffer). The
/// slow senders are cut off by the read timeout (408 for a body), the 64 get the same text
/// either way, /metrics answers meanwhile, and the coordinator's memory stays bounded. Prints
/// both loads' tokens/s and the latency histograms' p50/p99.
#[test]
fn sixty_four_streams_beside_sixteen_slow_clients() {
    let s = Server::run(&[
        "--http-read-timeout",
        "2",
        "--http-write-timeout",
        "3",
        "--http-max-body-mib",
        "1",
    ]);
    let http = s.http.clone();
    let n_tok = 16;
    let body = |i: usize| {
        json!({"prompt": format!("Client {i} asks: what is the best thing about {}?",
                                 ["rain", "maps", "owls", "tea"][i % 4]),
               "max_tokens": n_tok, "temperature": 0, "ignore_eos": true, "stream": true,
               "stream_options": {"include_usage": true}})
    };
    let load = |label: &str| -> (Vec<String>, f64) {
        let t = Instant::now();
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (http, b) = (http.clone(), body(i));
                std::thread::spawn(move || stream_completion(&http, &b, |_| {}))
            })
            .collect();
        let texts: Vec<String> = handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.finish, "length");
                assert_eq!(r.usage["completion_tokens"], n_tok);
                r.text
            })
            .collect();
        let rate = (64 * n_tok) as f64 / t.elapsed().as_secs_f64();
        eprintln!("{label}: 64 streams x {n_tok} tokens at {rate:.1} tokens/s");
        (texts, rate)
    };
    let (alone, rate_alone) = load("alone");
    let rss_before = rss(s.child.id());

    // The slow clients, each in its own thread, reporting what the server did to it.
    let slow: Vec<std::thread::JoinHandle<String>> = (0..16)
        .map(|i| {
            let http = http.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                match i {
                    // Slowloris: a header line a byte every 300 ms, never finished.
                    0..6 => {
                        let mut c = std::net::TcpStream::connect(&http).unwrap();
                        let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                        for b in head {
                            if c.write_all(&[*b]).is_err() {
                                return format!("headers cut off after {:.1?}", t.elapsed());
                            }
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        format!("headers never cut off ({:.1?})", t.elapsed())
                    }
                    // A body that never finishes.
                    6..11 => {
                        let mut c = std::net::TcpStream::connect(&http).unwrap();
                        c.write_all(
                            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\
                              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":",
                        )
                        .unwrap();
                        let mut answer = String::new();
                        let _ = c.read_to_string(&mut answer);
                        let status = answer.lines().next().unwrap_or("").to_string();
                        format!("body: {status} after {:.1?}", t.elapsed())
                    }
                    // Never reads (until the end): a short answer, or a longer one into a 4 KiB
                    // receive buffer. Either waits in the kernel's socket buffers; the server
                    // goes on (a write that stalls for the write timeout drops the connection:
                    // the unit test of `WriteTimeout`).
                    _ => {
                        let long = i >= 13;
                        let mut c = if long {
                            tiny_buffer_connection(&http)
                        } else {
                            std::net::TcpStream::connect(&http).unwrap()
                        };
                        let b = json!({"prompt": "Tell me everything.", "stream": true,
                                       "max_tokens": if long { 64 } else { 16 },
                                       "ignore_eos": true})
                        .to_string();
                        write!(
                            c,
                            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                            b.len()
                        )
                        .unwrap();
                        std::thread::sleep(Duration::from_secs(12));
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut all = Vec::new();
                        let _ = c.read_to_end(&mut all);
                        let all = String::from_utf8_lossy(&all);
                        let done = all.contains("[DONE]");
                        format!("never read ({}): done {done}", if long { "long" } else { "short" })
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // /metrics answers while all of that goes on.
    let (mtx, mrx) = mpsc::channel();
    let http2 = http.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let t = Instant::now();
        let r = get(&http2, "/metrics");
        let _ = mtx.send((r.status, t.elapsed()));
    });
    let (beside, rate_beside) = load("beside 16 slow clients");
    assert_eq!(
        beside, alone,
        "the slow clients changed the others' answers"
    );
    let (status, took) = mrx.recv().unwrap();
    assert_eq!(status, 200);
    eprintln!("/metrics answered in {took:.1?} under load");
    let outcomes: Vec<String> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("slow clients: {outcomes:#?}");
    for (i, o) in outcomes.iter().enumerate() {
        match i {
            0..6 => assert!(o.starts_with("headers cut off"), "{o}"),
            6..11 => assert!(o.starts_with("body: HTTP/1.1 408"), "{o}"),
            _ => assert!(o.ends_with("done true"), "{o}"),
        }
    }
    // A body over --http-max-body-mib (1): 413, without the server reading it all.
    let mut c = std::net::TcpStream::connect(&http).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Type: application/json\r\nContent-Length: 2097152\r\n\r\n",
    );
    let _ = c.write_all(&vec![b' '; 3 << 19]);
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let m = s.metrics();
    let rss_after = rss(s.child.id());
    assert!(
        rss_after < rss_before + (64 << 20),
        "the coordinator grew from {rss_before} to {rss_after} bytes"
    );
    for name in [
        "tessera_time_to_first_token_seconds",
        "tessera_time_per_output_token_seconds",
        "tessera_e2e_request_latency_seconds",
    ] {
        eprintln!(
            "{name}: p50 <= {} s, p99 <= {} s",
            quantile(&m, name, 0.5),
            quantile(&m, name, 0.99)
        );
    }
    eprintln!(
        "tokens/s beside the slow clients / alone: {:.2}; coordinator RSS {} -> {} MiB",
        rate_beside / rate_alone,
        rss_before >> 20,
        rss_after >> 20
    );
}
