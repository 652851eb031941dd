//! Downloads from the Hugging Face hub and OpenAI's checkpoint store, against a local HTTP
//! server that serves the fixture files the way those hosts do (ranges, etags, commit ids).

mod common;

use common::{s, stderr, tempdir};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
}

/// Serves `files` (URL path -> bytes) until the test process exits.
fn serve(files: HashMap<String, Vec<u8>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (requests.clone(), log.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range_start: Option<usize> = None;
            let mut range_end: Option<usize> = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    range_start = a.parse().ok();
                    range_end = b.parse().ok();
                }
            }
            count.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(path.clone());
            let response = match files.get(&path) {
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
                Some(body) => {
                    let size = body.len();
                    let (status, from, to) = match range_start {
                        Some(a) => ("206 Partial Content", a, range_end.unwrap_or(size - 1)),
                        None => ("200 OK", 0, size - 1),
                    };
                    let part = &body[from.min(size)..(to + 1).min(size)];
                    let mut r = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{to}/{size}\r\n\
                         ETag: \"etag-{}-{size}\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\n\
                         Connection: close\r\n\r\n",
                        part.len(),
                        path.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(part);
                    r
                }
            };
            let _ = stream.write_all(&response);
        }
    });
    Server { url, requests, log }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn igpt_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_igpt"));
    c.args(["--threads", "2"]).args(args);
    for k in [
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_HOME",
        "IGPT_CACHE",
        "IGPT_TF_ENDPOINT",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn hugging_face_models_download_once_then_work_offline() {
    let mut files = HashMap::new();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        files.insert(
            format!("/acme/tiny-igpt/resolve/main/{f}"),
            std::fs::read(fixture("hf/small-a").join(f)).unwrap(),
        );
    }
    let server = serve(files);
    let home = tempdir("hf-home");
    let env = [("HF_ENDPOINT", server.url.as_str()), ("HF_HOME", s(&home))];
    let o = igpt_env(&["info", "--model", "acme/tiny-igpt"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("2 layers, d=32"), "{out}");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.ends_with("model.safetensors"))
    );
    // The files sit in the Hugging Face cache layout.
    assert!(home.join("hub/models--acme--tiny-igpt/snapshots").is_dir());

    // A second use hits the cache, not the network; offline mode works from the cache too.
    let before = server.requests.load(Ordering::SeqCst);
    let o = igpt_env(&["info", "--model", "acme/tiny-igpt"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", s(&home))];
    let o = igpt_env(&["info", "--model", "acme/tiny-igpt"], &offline);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.requests.load(Ordering::SeqCst), before);

    // Offline with an empty cache, and a repository the server does not have: clear errors.
    let empty = tempdir("hf-empty");
    let o = igpt_env(
        &["info", "--model", "acme/tiny-igpt"],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", s(&empty))],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));
    let o = igpt_env(
        &["info", "--model", "acme/missing"],
        &[("HF_ENDPOINT", server.url.as_str()), ("HF_HOME", s(&empty))],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Hugging Face hub"), "{}", stderr(&o));
}

#[test]
fn openai_checkpoints_download_by_their_url_pattern() {
    let mut files = HashMap::new();
    for (model, dir) in [
        ("igpt-s", "tf/igpt-tiny"),
        ("igpt-s-bert", "tf/igpt-tiny-bert"),
    ] {
        for e in std::fs::read_dir(fixture(dir)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if name.starts_with("model.ckpt-1000") {
                files.insert(
                    format!("/checkpoints/{model}/1000/{name}"),
                    std::fs::read(fixture(dir).join(&name)).unwrap(),
                );
            }
        }
    }
    files.insert(
        "/color-clusters/kmeans_centers.npy".to_string(),
        std::fs::read(fixture("tf/igpt-tiny/kmeans_centers.npy")).unwrap(),
    );
    let server = serve(files);
    let cache = tempdir("tf-cache");
    let env = [
        ("IGPT_TF_ENDPOINT", server.url.as_str()),
        ("IGPT_CACHE", s(&cache)),
    ];
    let o = igpt_env(&["info", "--model", "openai-tf/igpt-s@1000"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Autoregressive"));
    // Every shard the index names was fetched.
    let log = server.log.lock().unwrap().clone();
    assert_eq!(
        log.iter()
            .filter(|p| p.contains("igpt-s/1000/model.ckpt-1000.data-"))
            .count(),
        3,
        "{log:?}"
    );
    let o = igpt_env(&["info", "--model", "openai-tf/igpt-s-bert@1000"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Bert"));
    // Cached now: no more requests.
    let before = server.requests.load(Ordering::SeqCst);
    let o = igpt_env(&["info", "--model", "openai-tf/igpt-s@1000"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.requests.load(Ordering::SeqCst), before);
    // Names that are not OpenAI's.
    let o = igpt_env(&["info", "--model", "openai-tf/igpt-xl"], &env);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("igpt-s, igpt-m or igpt-l"),
        "{}",
        stderr(&o)
    );
}
