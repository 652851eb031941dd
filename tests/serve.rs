//! `igpt serve` over HTTP: the page, the JSON API, streamed completions equal to
//! `igpt complete`, shared rounds, limits, the busy answer and cancellation.

mod common;
use common::server::{Server, fashion_run, slow_model};
use common::{igpt, s, tempdir};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

fn get_bytes(url: &str) -> (u16, String, Vec<u8>) {
    let r = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let (code, kind) = (r.status(), r.content_type().to_string());
    let mut body = Vec::new();
    r.into_reader().read_to_end(&mut body).unwrap();
    (code, kind, body)
}

/// Example `i` of the shipped split, saved as a PNG file.
fn example(server: &Server, dir: &Path, i: usize) -> PathBuf {
    let (code, kind, png) = get_bytes(&server.url(&format!("/api/examples/{i}")));
    assert_eq!((code, kind.as_str()), (200, "image/png"));
    let p = dir.join(format!("example{i}.png"));
    std::fs::write(&p, png).unwrap();
    p
}

fn tokens_of(v: &Value) -> Vec<u16> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x.as_array() {
            Some(a) => a.iter().map(|y| y.as_u64().unwrap() as u16).collect(),
            None => vec![x.as_u64().unwrap() as u16],
        })
        .collect()
}

fn npy_tokens(p: &Path) -> Vec<u16> {
    igpt::npy::read(p)
        .unwrap()
        .data
        .chunks(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// `igpt complete` of one image file: its completions' tokens (files written in `img`'s
/// folder, or in a fresh one for an image of the repository).
fn cli_complete(
    run: &Path,
    img: &Path,
    rows: usize,
    k: usize,
    seed: u64,
    extra: &[&str],
) -> Vec<u16> {
    let mut dir = img.parent().unwrap().to_path_buf();
    if dir.starts_with(env!("CARGO_MANIFEST_DIR")) {
        dir = tempdir("serve-cli-complete");
    }
    let npy = dir.join(format!("complete-{rows}-{k}-{seed}.npy"));
    let (rows, k, seed) = (rows.to_string(), k.to_string(), seed.to_string());
    let mut args = vec![
        "complete",
        "--model",
        s(run),
        "--images",
        s(img),
        "--rows",
        &rows,
        "--k",
        &k,
        "--seed",
        &seed,
        "--tokens",
        s(&npy),
        "--out",
    ];
    let grid = dir.join("grid.png");
    args.push(s(&grid));
    args.extend_from_slice(extra);
    let o = igpt(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    npy_tokens(&npy)
}

#[test]
fn the_page_and_the_model_description_load() {
    let dir = tempdir("serve-page");
    let run = fashion_run(&dir);
    let server = Server::start(&run, &[]);
    let (code, kind, html) = get_bytes(&server.url("/"));
    let html = String::from_utf8(html).unwrap();
    assert_eq!(code, 200);
    assert!(kind.starts_with("text/html"), "{kind}");
    for id in [
        "id=\"grid\"",
        "id=\"complete\"",
        "id=\"sample\"",
        "/app.js",
        "/style.css",
    ] {
        assert!(html.contains(id), "the page lacks {id}");
    }
    let (code, kind, js) = get_bytes(&server.url("/app.js"));
    assert_eq!((code, kind.as_str()), (200, "text/javascript"));
    assert!(String::from_utf8(js).unwrap().contains("/api/encode"));
    let (code, kind, _) = get_bytes(&server.url("/style.css"));
    assert_eq!((code, kind.as_str()), (200, "text/css"));

    let (code, m) = server.get_json("/api/model");
    assert_eq!(code, 200);
    assert_eq!(m["side"], 14);
    assert_eq!(m["colours"], 16);
    assert_eq!(m["palette"].as_array().unwrap().len(), 16);
    let (code, ex) = server.get_json("/api/examples");
    assert_eq!((code, ex["count"].as_u64()), (200, Some(10_000)));
    let (code, e) = server.get_json("/api/examples/10000");
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("0 to 9999"), "{e}");
    let (code, e) = server.get_json("/api/no-such-thing");
    assert_eq!(code, 404);
    assert!(e["error"].is_string());
    let (code, st) = server.get_json("/api/status");
    assert_eq!((code, &st["rounds"]), (200, &Value::from(0)));
}

#[test]
fn a_completion_streams_one_event_per_row_and_equals_igpt_complete() {
    let dir = tempdir("serve-complete");
    let run = fashion_run(&dir);
    let server = Server::start(&run, &["--precision", "f32"]);
    let img = example(&server, &dir, 3);
    let png = std::fs::read(&img).unwrap();
    let (side, rows, n) = (14, 5, 3);

    let events = server.stream(&format!("/api/complete?rows={rows}&n={n}&seed=9"), &png);
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    let mut want = vec!["start"];
    want.extend(std::iter::repeat_n("row", side - rows));
    want.push("done");
    assert_eq!(names, want);
    let (_, enc) = server.post_json("/api/encode", &png);
    let original = tokens_of(&enc["tokens"]);
    assert_eq!(original.len(), side * side);
    assert_eq!(tokens_of(&events[0].1["kept"]), original[..rows * side]);
    let done = tokens_of(&events.last().unwrap().1["tokens"]);
    assert_eq!(done.len(), n * side * side);
    // Row events in order, each row of every image as the final images have it.
    for (i, (_, ev)) in events[1..events.len() - 1].iter().enumerate() {
        let row = ev["row"].as_u64().unwrap() as usize;
        assert_eq!(row, rows + i);
        let got: Vec<Vec<u16>> = ev["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u16)
                    .collect()
            })
            .collect();
        assert_eq!(got.len(), n);
        for (j, r) in got.iter().enumerate() {
            let at = j * side * side + row * side;
            assert_eq!(r[..], done[at..at + side]);
        }
    }
    // The same images as the command line, seed for seed.
    let cli = cli_complete(&run, &img, rows, n, 9, &["--precision", "f32"]);
    assert_eq!(done, cli);
    let other = server.stream(&format!("/api/complete?rows={rows}&n={n}&seed=10"), &png);
    assert_ne!(tokens_of(&other.last().unwrap().1["tokens"]), done);

    // Unconditional samples: those of `igpt sample`.
    let events = server.stream("/api/sample?n=2&seed=4&temperature=0.9&top_k=5", &[]);
    assert_eq!(events.len(), 1 + side + 1);
    let npy = dir.join("samples.npy");
    let o = igpt(&[
        "sample",
        "--model",
        s(&run),
        "--n",
        "2",
        "--seed",
        "4",
        "--temperature",
        "0.9",
        "--top-k",
        "5",
        "--precision",
        "f32",
        "--tokens",
        s(&npy),
        "--out",
        s(&dir.join("samples.png")),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        tokens_of(&events.last().unwrap().1["tokens"]),
        npy_tokens(&npy)
    );

    // The likelihood of the image: that of `igpt score`.
    let (code, sc) = server.post_json("/api/score", &png);
    assert_eq!(code, 200, "{sc}");
    let csv = dir.join("score.csv");
    let o = igpt(&[
        "score",
        "--model",
        s(&run),
        "--images",
        s(&img),
        "--precision",
        "f32",
        "--csv",
        s(&csv),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    let cli: f64 = text
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let served = sc["nats_per_token"].as_f64().unwrap();
    assert!(
        (served - cli).abs() <= 1e-4 * cli,
        "served {served}, igpt score {cli}"
    );
    let bits = sc["bits_per_token"].as_f64().unwrap();
    assert!((bits - served / std::f64::consts::LN_2).abs() < 1e-9);
    let st = server.wait_status(|st| st["requests_done"] == 4);
    assert_eq!(st["requests_done"], 4, "{st}");
}

#[test]
fn requests_that_arrive_together_share_a_round_and_keep_their_own_images() {
    let dir = tempdir("serve-share");
    let run = fashion_run(&dir);
    for precision in ["f32", "bf16"] {
        shared_round(&dir, &run, precision);
    }
}

fn shared_round(dir: &Path, run: &Path, precision: &str) {
    // Long enough a gathering window that requests sent together always meet.
    let server = Server::start(run, &["--gather-ms", "1500", "--precision", precision]);
    let a = example(&server, dir, 0);
    let b = example(&server, dir, 7);
    let jobs = [(a.clone(), 2, 11), (b.clone(), 3, 12)];
    let results: Vec<Vec<(String, Value)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(img, n, seed)| {
                let server = &server;
                sc.spawn(move || {
                    let png = std::fs::read(img).unwrap();
                    server.stream(&format!("/api/complete?rows=6&n={n}&seed={seed}"), &png)
                })
            })
            .collect();
        // A sample needs no prefill: it does not join the completions' round.
        let sample = server.stream("/api/sample?n=1&seed=1", &[]);
        assert_eq!(sample[0].1["round_requests"], 1, "{:?}", sample[0]);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (s0, s1) = (&results[0][0].1, &results[1][0].1);
    assert_eq!(s0["round_requests"], 2, "{s0}");
    assert_eq!(s0["round"], s1["round"]);
    assert_eq!(s0["round_images"], 5);
    // Each request's images are those it gets alone.
    for ((img, n, seed), events) in jobs.iter().zip(&results) {
        let done = tokens_of(&events.last().unwrap().1["tokens"]);
        assert_eq!(
            done,
            cli_complete(run, img, 6, *n, *seed, &["--precision", precision])
        );
    }
    let st = server.get_json("/api/status").1;
    assert_eq!(st["rounds"], 2, "{st}");
}

#[test]
fn bad_requests_get_a_4xx_with_a_message_and_the_server_goes_on() {
    let dir = tempdir("serve-bad");
    let run = fashion_run(&dir);
    let server = Server::start(
        &run,
        &[
            "--max-upload-mb",
            "0.01",
            "--max-image-side",
            "64",
            "--max-steps",
            "150",
        ],
    );
    let png = std::fs::read(example(&server, &dir, 1)).unwrap();
    let wide = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::GrayImage::from_pixel(100, 10, image::Luma([9]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/api/complete?rows=7",
            b"hello, not an image".to_vec(),
            415,
            "not a PNG or JPEG",
        ),
        ("/api/encode", Vec::new(), 400, "no image"),
        (
            "/api/complete?rows=7",
            png[..png.len() / 2].to_vec(),
            400,
            "cannot decode",
        ),
        ("/api/encode", noise, 413, "larger than this server's limit"),
        ("/api/encode", wide, 413, "64 pixels a side"),
        ("/api/complete?rows=14", png.clone(), 400, "keep 0 to 13"),
        (
            "/api/complete?rows=7&n=0",
            png.clone(),
            400,
            "1 to 8 images",
        ),
        (
            "/api/complete?rows=7&n=99",
            png.clone(),
            400,
            "1 to 8 images",
        ),
        (
            "/api/complete?rows=7&temperature=-1",
            png.clone(),
            400,
            "temperature",
        ),
        ("/api/complete?rows=7&top_p=2", png.clone(), 400, "top-p"),
        (
            "/api/complete?rows=7&colour=red",
            png.clone(),
            400,
            "unknown field",
        ),
        ("/api/complete?rows=seven", png.clone(), 400, "bad query"),
        ("/api/complete?rows=2", png.clone(), 400, "at most 150"),
        ("/api/sample?n=1", Vec::new(), 400, "at most 150"),
        ("/api/sample?rows=3", Vec::new(), 400, "keep no rows"),
    ];
    for (path, body, code, msg) in cases {
        let (got, v) = server.post_json(path, &body);
        assert_eq!(got, code, "{path}: {v}");
        let err = v["error"].as_str().unwrap_or_else(|| panic!("{path}: {v}"));
        assert!(err.contains(msg), "{path}: {err:?} lacks {msg:?}");
    }
    let (code, v) = server.post_json("/api/score", &png);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at most 150"), "{v}");
    for (path, code) in [
        ("/api/examples/x", 400),
        ("/api/examples/%FF", 400),
        ("/api/complete", 405),
    ] {
        let (got, v) = server.get_json(path);
        assert_eq!(got, code, "{path}: {v}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    // Still serving, and nothing reached the model.
    let ok = server.stream("/api/complete?rows=7&n=1", &png);
    assert_eq!(ok.last().unwrap().0, "done");
    assert_eq!(server.get_json("/api/status").1["rounds"], 1);
}

#[test]
fn a_full_queue_answers_busy_at_once() {
    let dir = tempdir("serve-busy");
    let run = fashion_run(&dir);
    // The first request waits 3 s for a partner; meanwhile it fills the queue of one.
    let server = Server::start(
        &run,
        &[
            "--queue",
            "1",
            "--batch",
            "2",
            "--max-images",
            "1",
            "--gather-ms",
            "3000",
        ],
    );
    let (code, mut first) = server.open_stream("/api/sample?n=1", &[]);
    assert_eq!(code, 200);
    server.wait_status(|st| st["waiting"] == 1);
    let t0 = std::time::Instant::now();
    let busy = match ureq::post(&server.url("/api/sample?n=1")).send_bytes(&[]) {
        Err(ureq::Error::Status(503, r)) => r,
        other => panic!("expected 503, got {:?}", other.map(|r| r.status())),
    };
    assert_eq!(busy.header("retry-after"), Some("1"));
    let v: Value = busy.into_json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    assert!(t0.elapsed().as_secs_f64() < 2.0, "the busy answer waited");
    let mut last = None;
    while let Some(e) = first.next_event() {
        last = Some(e.0);
    }
    assert_eq!(last.as_deref(), Some("done"));
    let st = server.get_json("/api/status").1;
    assert_eq!(
        (
            st["requests_refused"].as_u64(),
            st["requests_done"].as_u64()
        ),
        (Some(1), Some(1))
    );

    // A waiting request whose client leaves gives its place up long before its round would
    // have started (the gathering window is 10 s).
    let server = Server::start(
        &run,
        &[
            "--queue",
            "1",
            "--batch",
            "2",
            "--max-images",
            "1",
            "--gather-ms",
            "10000",
        ],
    );
    let (code, leaves) = server.open_stream("/api/sample?n=1", &[]);
    assert_eq!(code, 200);
    server.wait_status(|st| st["waiting"] == 1);
    drop(leaves);
    let t0 = std::time::Instant::now();
    let next = loop {
        let (code, ev) = server.open_stream("/api/sample?n=1", &[]);
        if code == 200 {
            break ev;
        }
        assert_eq!(code, 503);
        assert!(
            t0.elapsed().as_secs_f64() < 8.0,
            "the place was not given up"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    drop(next);
    let st = server.wait_status(|st| st["requests_cancelled"].as_u64() >= Some(1));
    assert!(st["requests_cancelled"].as_u64() >= Some(1), "{st}");
}

#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let dir = tempdir("serve-cancel");
    let model = slow_model(&dir);
    let server = Server::start(&model, &["--batch", "8", "--gather-ms", "0"]);
    let (code, mut ev) = server.open_stream("/api/sample?n=8&seed=1", &[]);
    assert_eq!(code, 200);
    assert_eq!(ev.next_event().unwrap().0, "start");
    assert_eq!(ev.next_event().unwrap().0, "row");
    drop(ev);
    let st = server.wait_status(|st| st["requests_cancelled"] == 1 && st["running"] == false);
    assert_eq!(st["requests_cancelled"], 1, "{st}");
    assert_eq!(st["requests_done"], 0, "{st}");
    let skipped = st["tokens_skipped"].as_u64().unwrap();
    assert!(
        skipped > 0,
        "the dropped images were generated to the end: {st}"
    );

    // Two requests share a round and one leaves: its images are dropped from the batch, and
    // the other's still equal `igpt sample`.
    let server = Server::start(&model, &["--batch", "8", "--gather-ms", "1500"]);
    let stays = std::thread::scope(|sc| {
        let stays = sc.spawn(|| server.stream("/api/sample?n=2&seed=7", &[]));
        let (code, mut leaves) = server.open_stream("/api/sample?n=4&seed=1", &[]);
        assert_eq!(code, 200);
        let (name, start) = leaves.next_event().unwrap();
        assert_eq!(
            (name.as_str(), start["round_requests"].as_u64()),
            ("start", Some(2))
        );
        assert_eq!(leaves.next_event().unwrap().0, "row");
        drop(leaves);
        stays.join().unwrap()
    });
    assert_eq!(stays[0].1["round_images"], 6);
    let npy = dir.join("stays.npy");
    let o = igpt(&[
        "sample",
        "--model",
        s(&model),
        "--n",
        "2",
        "--seed",
        "7",
        "--tokens",
        s(&npy),
        "--out",
        s(&dir.join("stays.png")),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        tokens_of(&stays.last().unwrap().1["tokens"]),
        npy_tokens(&npy)
    );
    let st = server.get_json("/api/status").1;
    assert_eq!(
        (
            st["requests_cancelled"].as_u64(),
            st["requests_done"].as_u64()
        ),
        (Some(1), Some(1)),
        "{st}"
    );
    assert!(st["tokens_skipped"].as_u64().unwrap() > 0, "{st}");

    // A request whose client leaves while it waits for its round never reaches the model.
    let server = Server::start(&model, &["--batch", "8", "--gather-ms", "2000"]);
    let (code, ev) = server.open_stream("/api/sample?n=1", &[]);
    assert_eq!(code, 200);
    server.wait_status(|st| st["waiting"] == 1);
    drop(ev);
    let st = server.wait_status(|st| st["requests_cancelled"] == 1);
    assert_eq!(
        (st["requests_cancelled"].as_u64(), st["rounds"].as_u64()),
        (Some(1), Some(0)),
        "{st}"
    );
}

#[test]
fn a_hugging_face_rgb_model_serves_the_same_ids_and_completions_as_the_commands() {
    let dir = tempdir("serve-hf");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/small-a");
    let img =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/chelsea-rgb-131x97.png");
    let png = std::fs::read(&img).unwrap();
    let server = Server::start(&model, &["--precision", "f32"]);
    let (_, m) = server.get_json("/api/model");
    assert_eq!(
        (m["side"].as_u64(), m["channels"].as_u64()),
        (Some(8), Some(3))
    );
    let colours = m["palette"].as_array().unwrap();
    assert_eq!(colours.len(), 16);
    assert!(
        colours.iter().any(|c| c[0] != c[1] || c[1] != c[2]),
        "an RGB palette has colours"
    );

    let (code, enc) = server.post_json("/api/encode", &png);
    assert_eq!(code, 200, "{enc}");
    assert_eq!(
        (enc["width"].as_u64(), enc["height"].as_u64()),
        (Some(131), Some(97))
    );
    let npy = dir.join("ids.npy");
    let o = igpt(&["encode", "--model", s(&model), "--out", s(&npy), s(&img)]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let ids: Vec<u16> = igpt::npy::read(&npy)
        .unwrap()
        .data
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u16)
        .collect();
    assert_eq!(tokens_of(&enc["tokens"]), ids);

    let events = server.stream("/api/complete?rows=3&n=2&seed=2", &png);
    assert_eq!(events.len(), 1 + (8 - 3) + 1);
    let done = tokens_of(&events.last().unwrap().1["tokens"]);
    assert_eq!(
        done,
        cli_complete(&model, &img, 3, 2, 2, &["--precision", "f32"])
    );
}

#[test]
fn hostile_uploads_and_queries_never_get_a_server_error() {
    let dir = tempdir("serve-hostile");
    let run = fashion_run(&dir);
    let server = Server::start(&run, &["--gather-ms", "0"]);
    let png = std::fs::read(example(&server, &dir, 2)).unwrap();
    let jpeg = {
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    };
    let mut rng = common::Rng(0x5eed_cafe);
    let mut answers = std::collections::BTreeMap::new();
    // Damaged files, past their signature (so they are decoded, not refused at the door).
    for i in 0..240 {
        let good = if i % 2 == 0 { &png } else { &jpeg };
        let body = rng.mutate(good, 8);
        let path = if i % 3 == 0 {
            "/api/complete?rows=7&n=1"
        } else {
            "/api/encode"
        };
        let (code, text) = server.post_text(path, &body);
        assert!(
            code == 200 || (400..500).contains(&code),
            "{path}: {code} {text}"
        );
        if code != 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        }
        *answers.entry(code).or_insert(0) += 1;
    }
    // Odd values for every setting.
    let values = [
        "",
        "-1",
        "0",
        "1",
        "14",
        "1e9",
        "nan",
        "inf",
        "18446744073709551616",
        "%00",
        "x",
    ];
    let keys = ["rows", "n", "temperature", "top_k", "top_p", "seed"];
    for _ in 0..120 {
        let mut q = Vec::new();
        for _ in 0..1 + rng.next() % 3 {
            let k = keys[rng.next() as usize % keys.len()];
            let v = values[rng.next() as usize % values.len()];
            q.push(format!("{k}={v}"));
        }
        let path = format!("/api/complete?{}", q.join("&"));
        let (code, text) = server.post_text(&path, &png);
        assert!(code < 500, "{path}: {code} {text}");
    }
    assert!(
        answers.len() >= 2,
        "the damage was never noticed or always refused: {answers:?}"
    );
    let (code, st) = server.get_json("/api/status");
    assert_eq!((code, st["running"].as_bool()), (200, Some(false)), "{st}");
}
