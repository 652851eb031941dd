//! An `igpt serve` process for the HTTP and browser tests, on 127.0.0.1 with a port the
//! system picks, ended when dropped.

use super::{igpt, s};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    pub addr: String,
}

impl Server {
    /// Starts `igpt serve --model MODEL --port 0 EXTRA...` and waits for its address.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_igpt"))
            .args([
                "--threads",
                "2",
                "serve",
                "--model",
                s(model),
                "--port",
                "0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start igpt serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the server's first line");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        let addr = base.trim_start_matches("http://").to_string();
        Server { child, base, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET as JSON (any status).
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        answer(ureq::get(&self.url(path)).call())
    }

    /// POST `body` as JSON (any status).
    pub fn post_json(&self, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        answer(ureq::post(&self.url(path)).send_bytes(body))
    }

    /// POST `body`: the status and the answer as text (any status).
    pub fn post_text(&self, path: &str, body: &[u8]) -> (u16, String) {
        let r = match ureq::post(&self.url(path)).send_bytes(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        (r.status(), r.into_string().unwrap())
    }

    /// `/api/status`, polled until `ok` holds (or a deadline of 20 s passes).
    pub fn wait_status(&self, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, st) = self.get_json("/api/status");
            if ok(&st) || Instant::now() > until {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a POST whose answer is an event stream, on a raw socket (so a test can drop it
    /// part-way): the status line, then `Events`.
    pub fn open_stream(&self, path: &str, body: &[u8]) -> (u16, Events) {
        let mut sock = std::net::TcpStream::connect(&self.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            sock,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        sock.write_all(body).unwrap();
        let mut reader = BufReader::new(sock);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut chunked = false;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
            {
                chunked = true;
            }
            if h == "\r\n" || h.is_empty() {
                break;
            }
        }
        (
            code,
            Events {
                reader,
                chunked,
                text: String::new(),
            },
        )
    }

    /// Every event of a stream to its end.
    pub fn stream(&self, path: &str, body: &[u8]) -> Vec<(String, serde_json::Value)> {
        let (code, mut ev) = self.open_stream(path, body);
        assert_eq!(code, 200, "{path}: {:?}", ev.rest());
        std::iter::from_fn(|| ev.next_event()).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let code = r.status();
    let text = r.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{code}: {text:?}: {e}"));
    (code, json)
}

/// Server-sent events read from a socket.
pub struct Events {
    reader: BufReader<std::net::TcpStream>,
    chunked: bool,
    text: String,
}

impl Events {
    /// More of the body, or false at its end.
    fn fill(&mut self) -> bool {
        if self.chunked {
            let mut size = String::new();
            if self.reader.read_line(&mut size).unwrap_or(0) == 0 {
                return false;
            }
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                return false;
            }
            let mut buf = vec![0; n + 2];
            if self.reader.read_exact(&mut buf).is_err() {
                return false;
            }
            self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        } else {
            let mut buf = [0; 4096];
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        true
    }

    /// The next event with data (comments and keep-alives skipped): its name and JSON data.
    pub fn next_event(&mut self) -> Option<(String, serde_json::Value)> {
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut name = "message".to_string();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    return Some((name, serde_json::from_str(&data).unwrap()));
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Whatever is left of the body, as text.
    pub fn rest(&mut self) -> String {
        while self.fill() {}
        std::mem::take(&mut self.text)
    }
}

/// A small model trained for a few steps on the shipped Fashion-MNIST split at 14x14 in 16
/// gray levels, in `dir/run`.
pub fn fashion_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let o = igpt(&[
        "train",
        "--data",
        "fashion-mnist",
        "--limit",
        "200",
        "--out",
        s(&run),
        "--side",
        "14",
        "--palette-size",
        "16",
        "--layers",
        "1",
        "--embd",
        "32",
        "--heads",
        "2",
        "--steps",
        "5",
        "--batch",
        "8",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run
}

/// A random model large enough that generating its images takes a while.
pub fn slow_model(dir: &Path) -> PathBuf {
    let cfg = igpt::config::ModelConfig {
        n_layer: 4,
        n_embd: 128,
        n_head: 4,
        n_vocab: 16,
        side: 64,
        channels: 1,
        objective: Default::default(),
    };
    let path = dir.join("slow");
    let run = igpt::checkpoint::RunDir::create(&path).unwrap();
    run.save_config(&igpt::checkpoint::RunConfig {
        model: cfg.clone(),
        train: Default::default(),
        data: "none".into(),
        igpt_version: "test".into(),
    })
    .unwrap();
    run.save_palette(&igpt::palette::Palette::uniform_gray(16).unwrap())
        .unwrap();
    run.save_model(&cfg, &igpt::model::init_params(&cfg, 1))
        .unwrap();
    path
}
