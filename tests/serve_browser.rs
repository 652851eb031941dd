//! The `igpt serve` page in a real headless Chromium, driven over the DevTools protocol: it
//! loads a Fashion-MNIST image, completes it, and the grid it offers for download equals the
//! grid `igpt complete` writes, pixel for pixel; the screenshot shows the grid.
//!
//! Needs Debian's `chromium-headless-shell` (or `chromium`; `IGPT_BROWSER` names another). Where
//! none is installed the test says so and passes, unless `IGPT_REQUIRE_BROWSER` is set, as
//! `.ci/run` sets it after installing one. `IGPT_SCREENSHOT=FILE` keeps the screenshot, and
//! `IGPT_SCREENSHOT_MODEL=RUN` serves that model instead of the test's own (the README's picture
//! is of the main job's model: `IGPT_SCREENSHOT=docs/serve.png IGPT_SCREENSHOT_MODEL=runs/demo`).

mod common;
use base64::Engine as _;
use common::server::{Server, fashion_run, slow_model};
use common::{igpt, s, tempdir};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

fn browser() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("IGPT_BROWSER") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium-headless-shell", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(exe: &PathBuf, profile: &std::path::Path) -> Browser {
        let mut child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = loop {
            let line = lines
                .next()
                .expect("the browser exited before its DevTools address")
                .unwrap();
            if let Some(at) = line.find("ws://") {
                break line[at..].trim().to_string();
            }
        };
        // Keep draining the browser's log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let port = ws_url
            .trim_start_matches("ws://")
            .split(['/', ':'])
            .nth(1)
            .unwrap();
        let list: Value = serde_json::from_str(
            &ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
                .call()
                .unwrap()
                .into_string()
                .unwrap(),
        )
        .unwrap();
        let page = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let (ws, _) = tungstenite::connect(page["webSocketDebuggerUrl"].as_str().unwrap())
            .expect("connect to the page's DevTools socket");
        Browser {
            child,
            ws,
            next_id: 1,
        }
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }
}

fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

#[test]
fn the_page_completes_an_image_in_a_real_browser() {
    let Some(exe) = browser() else {
        assert!(
            std::env::var_os("IGPT_REQUIRE_BROWSER").is_none(),
            "IGPT_REQUIRE_BROWSER is set but no headless Chromium was found: \
             apt-get install chromium-headless-shell"
        );
        eprintln!("skipped: no headless Chromium (apt-get install chromium-headless-shell)");
        return;
    };
    let dir = tempdir("serve-browser");
    let run = match std::env::var_os("IGPT_SCREENSHOT_MODEL") {
        Some(m) => PathBuf::from(m),
        None => fashion_run(&dir),
    };
    let server = Server::start(&run, &[]);
    let mut b = Browser::launch(&exe, &dir.join("profile"));
    let (example, rows, n, seed) = (5, 6, 4, 21);
    b.call(
        "Page.navigate",
        json!({ "url": server.url(&format!(
            "/?example={example}&rows={rows}&n={n}&seed={seed}&run=complete"
        )) }),
    );
    let until = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let st = b.eval("document.body ? document.body.dataset.state : ''");
        let st = st.as_str().unwrap_or("").to_string();
        if st == "done" || st == "error" || Instant::now() > until {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let summary = b.eval("document.getElementById('summary').textContent");
    assert_eq!(state, "done", "the page ended in {state:?}: {summary}");
    assert!(
        summary.as_str().unwrap().starts_with("Done: 4 image(s)"),
        "{summary}"
    );
    // The likelihood arrives on its own request.
    let until = Instant::now() + Duration::from_secs(30);
    let likelihood = loop {
        let l = b.eval("document.getElementById('likelihood').textContent");
        let l = l.as_str().unwrap().to_string();
        if l.contains("bits") || Instant::now() > until {
            break l;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(likelihood.contains("bits per pixel token"), "{likelihood}");

    // The grid offered for download is the one `igpt complete` draws for the same image and seed.
    let href = b.eval("document.getElementById('download').href");
    let b64 = href
        .as_str()
        .unwrap()
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data address");
    let downloaded = decode_png(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    );
    let png = dir.join("example.png");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&server.url(&format!("/api/examples/{example}")))
            .call()
            .unwrap()
            .into_reader(),
        &mut bytes,
    )
    .unwrap();
    std::fs::write(&png, bytes).unwrap();
    let grid = dir.join("cli-grid.png");
    let (rows_s, n_s, seed_s) = (rows.to_string(), n.to_string(), seed.to_string());
    let o = igpt(&[
        "complete",
        "--model",
        s(&run),
        "--images",
        s(&png),
        "--rows",
        &rows_s,
        "--k",
        &n_s,
        "--seed",
        &seed_s,
        "--out",
        s(&grid),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cli = decode_png(&std::fs::read(&grid).unwrap());
    assert_eq!(downloaded.dimensions(), cli.dimensions());
    assert!(
        downloaded == cli,
        "the page's grid differs from igpt complete's"
    );

    // The screenshot shows the grid: the canvas's part of it is not blank.
    let rect = b.eval(
        "(() => { const r = document.getElementById('grid').getBoundingClientRect(); \
         return [r.x, r.y, r.width, r.height]; })()",
    );
    let rect: Vec<u32> = rect
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().round() as u32)
        .collect();
    let shot = b.call("Page.captureScreenshot", json!({ "format": "png" }));
    let shot = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    if let Some(p) = std::env::var_os("IGPT_SCREENSHOT") {
        std::fs::write(p, &shot).unwrap();
    }
    let shot = decode_png(&shot);
    let (x, y, w, h) = (rect[0], rect[1], rect[2], rect[3]);
    assert!(w > 100 && h > 50, "the grid is drawn at {w}x{h}");
    let region = image::imageops::crop_imm(&shot, x, y, w, h).to_image();
    let mut levels = std::collections::BTreeSet::new();
    let dark = region.pixels().filter(|p| p[0] < 64).count();
    for p in region.pixels() {
        levels.insert(p.0);
    }
    assert!(
        levels.len() >= 8 && dark * 20 > region.pixels().len(),
        "the grid looks blank: {} colours, {dark} dark pixels of {}",
        levels.len(),
        region.pixels().len()
    );
}

/// Waits (up to 60 s) until the page's state is one of `states`, and returns it.
fn wait_state(b: &mut Browser, states: &[&str]) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let st = b.eval("document.body ? document.body.dataset.state : ''");
        let st = st.as_str().unwrap_or("").to_string();
        if states.contains(&st.as_str()) || Instant::now() > until {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stop_ends_a_generation_on_the_server() {
    let Some(exe) = browser() else {
        assert!(
            std::env::var_os("IGPT_REQUIRE_BROWSER").is_none(),
            "IGPT_REQUIRE_BROWSER is set but no headless Chromium was found"
        );
        eprintln!("skipped: no headless Chromium (apt-get install chromium-headless-shell)");
        return;
    };
    let dir = tempdir("serve-browser-stop");
    let model = slow_model(&dir);
    let server = Server::start(&model, &["--gather-ms", "0"]);
    let mut b = Browser::launch(&exe, &dir.join("profile"));
    b.call(
        "Page.navigate",
        json!({ "url": server.url("/?n=8&run=sample") }),
    );
    let until = Instant::now() + Duration::from_secs(60);
    while b
        .eval("Number(document.body.dataset.rowsSeen || 0)")
        .as_u64()
        < Some(1)
    {
        assert!(Instant::now() < until, "no row arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.eval("document.getElementById('stop').click()");
    assert_eq!(wait_state(&mut b, &["stopped", "done", "error"]), "stopped");
    let st = server.wait_status(|st| st["requests_cancelled"] == 1 && st["running"] == false);
    assert_eq!(
        (
            st["requests_cancelled"].as_u64(),
            st["requests_done"].as_u64()
        ),
        (Some(1), Some(0)),
        "{st}"
    );
    assert!(st["tokens_skipped"].as_u64().unwrap() > 0, "{st}");
}
