//! `memsteer serve` as a user runs it: started by the binary, answering on the printed address,
//! stopped by SIGTERM after in-flight work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use super::*;

/// One HTTP/1.1 exchange over a fresh connection; returns the status line and the body.
fn http(addr: &str, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

#[test]
fn serve_answers_on_the_printed_address_and_stops_on_sigterm() {
    let model = fixture("lm/tiny-gpt2-tokenizer");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memsteer"))
        .args(["--threads", "2", "serve", "--model", s(&model), "--port", "0", "--served-model-name", "tiny"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memsteer serve");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("the listening line");
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).expect(&line).to_string();
    assert!(line.contains("tiny on http://127.0.0.1:"), "{line}");

    let (status, body) = http(&addr, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(status.contains("200"), "{status} {body}");
    let req = r#"{"model": "tiny", "prompt": "The cat", "max_tokens": 5, "temperature": 0}"#;
    let (status, body) = http(
        &addr,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{req}",
            req.len()
        ),
    );
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["model"], "tiny");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let status = child.wait().expect("wait");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("stderr");
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("memsteer serve: stopped"), "{rest}");
}

#[test]
fn serve_refuses_bad_arguments_with_a_clear_error() {
    let model = fixture("lm/tiny-gpt2-tokenizer");
    // Without the `cuda` feature the build says how to get one; with it, on a machine without a GPU,
    // what is missing.
    let e = fails(&["serve", "--model", s(&model), "--device", "cuda"]);
    assert!(e.contains("--device cuda") && (e.contains("--features cuda") || e.contains("CUDA")), "{e}");
    let e = fails(&["serve", "--model", s(&model), "--device", "tpu"]);
    assert!(e.contains("--device tpu") && e.contains("tpu"), "{e}");
    let e = fails(&["serve", "--model", s(&model), "--steer", "sentiment"]);
    assert!(e.contains("expected NAME=FILE"), "{e}");
    let e = fails(&["serve", "--model", s(&model), "--steer", "a=/nonexistent/steer.safetensors", "--port", "0"]);
    assert!(e.contains("/nonexistent/steer.safetensors"), "{e}");
    let e = fails(&["serve", "--model", s(&model), "--max-batch", "0"]);
    assert!(e.contains("--max-batch"), "{e}");
    let e = fails(&["serve", "--model", "/nonexistent/model", "--port", "0"]);
    assert!(e.contains("/nonexistent/model"), "{e}");
}
