//! Sampling controls, reproducibility, completions, and the sample/complete/score commands.

mod common;
use common::{igpt, s, tempdir};

use igpt::backend::Device;
use igpt::config::ModelConfig;
use igpt::model::{Decoder, Engine};
use igpt::sample::{self, SampleOptions};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn model_and_params() -> (ModelConfig, Vec<f32>) {
    let cfg = ModelConfig {
        n_layer: 2,
        n_embd: 32,
        n_head: 4,
        n_vocab: 9,
        side: 5,
        channels: 1,
        objective: Default::default(),
    };
    let mut params = igpt::model::init_params(&cfg, 2);
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    for p in params.iter_mut() {
        *p += (r.random::<f32>() - 0.5) * 0.5;
    }
    (cfg, params)
}

fn decoder(batch: usize) -> Decoder {
    let (cfg, params) = model_and_params();
    let mut d = Decoder::new(&cfg, batch, &Device::Cpu).unwrap();
    d.set_params(&params).unwrap();
    d
}

#[test]
fn top_k_and_top_p_never_leave_the_allowed_set() {
    // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on colours 3, 0, 4, 1, 2.
    let probs = [0.3f32, 0.1, 0.05, 0.4, 0.15];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut scratch = sample::SampleScratch::default();
    let draw = |opts: SampleOptions,
                rng: &mut rand_chacha::ChaCha8Rng,
                scratch: &mut sample::SampleScratch| {
        let mut seen = [0usize; 5];
        for _ in 0..4000 {
            seen[sample::sample_token(&logits, &opts, rng, scratch) as usize] += 1;
        }
        seen
    };
    let k2 = draw(
        SampleOptions {
            top_k: 2,
            ..Default::default()
        },
        &mut rng,
        &mut scratch,
    );
    assert_eq!((k2[1], k2[2], k2[4]), (0, 0, 0), "top-2 drew {k2:?}");
    assert!(
        k2[3] > k2[0] && k2[0] > 1000,
        "top-2 keeps the two most likely in proportion: {k2:?}"
    );
    // top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third colour (4) is needed too.
    let p = draw(
        SampleOptions {
            top_p: 0.75,
            ..Default::default()
        },
        &mut rng,
        &mut scratch,
    );
    assert_eq!((p[1], p[2]), (0, 0), "top-p drew {p:?}");
    assert!(p[4] > 0);
    let both = draw(
        SampleOptions {
            top_k: 3,
            top_p: 0.5,
            ..Default::default()
        },
        &mut rng,
        &mut scratch,
    );
    assert_eq!((both[1], both[2], both[4]), (0, 0, 0), "{both:?}");
    // Untouched, every colour appears about as often as its probability.
    let all = draw(SampleOptions::default(), &mut rng, &mut scratch);
    for (c, &p) in probs.iter().enumerate() {
        let f = all[c] as f32 / 4000.0;
        assert!((f - p).abs() < 0.03, "colour {c}: {f} vs {p}");
    }
    // Near-zero temperature is greedy.
    let cold = draw(
        SampleOptions {
            temperature: 1e-4,
            ..Default::default()
        },
        &mut rng,
        &mut scratch,
    );
    assert_eq!(cold[3], 4000);
}

#[test]
fn greedy_generation_follows_the_full_forward_argmax() {
    let mut dec = decoder(2);
    let opts = SampleOptions {
        temperature: 0.0,
        ..Default::default()
    };
    let toks = sample::generate(&mut dec, &[&[], &[3, 1, 4]], &opts, 0, |_, _| {}).unwrap();
    let (cfg, params) = model_and_params();
    let t = cfg.n_ctx();
    let mut engine = Engine::new(&cfg, 2, false, &Device::Cpu).unwrap();
    engine.set_params(&params).unwrap();
    engine.forward(&toks).unwrap();
    let mut logits = Vec::new();
    engine.logits(&mut logits);
    let v = cfg.n_vocab;
    for b in 0..2 {
        for pos in 0..t {
            if b == 1 && pos < 3 {
                assert_eq!(toks[b * t + pos], [3, 1, 4][pos], "prefix kept");
                continue;
            }
            let row = &logits[(b * t + pos) * v..(b * t + pos + 1) * v];
            let best = (0..v).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap();
            assert_eq!(toks[b * t + pos] as usize, best, "image {b} position {pos}");
        }
    }
    // A near-zero temperature samples the same images.
    let near = SampleOptions {
        temperature: 1e-5,
        seed: 9,
        ..Default::default()
    };
    let toks2 = sample::generate(&mut dec, &[&[], &[3, 1, 4]], &near, 0, |_, _| {}).unwrap();
    assert_eq!(toks, toks2);
}

#[test]
fn the_same_seed_gives_the_same_images_whatever_the_batch() {
    let opts = SampleOptions {
        seed: 42,
        ..Default::default()
    };
    let mut four = decoder(4);
    let a = sample::generate(&mut four, &[&[] as &[u16]; 4], &opts, 0, |_, _| {}).unwrap();
    let b = sample::generate(&mut four, &[&[] as &[u16]; 4], &opts, 0, |_, _| {}).unwrap();
    assert_eq!(a, b);
    let t = 25;
    // Image 2 of the batch equals image 2 generated alone.
    let mut one = decoder(1);
    let c = sample::generate(&mut one, &[&[]], &opts, 2, |_, _| {}).unwrap();
    assert_eq!(&a[2 * t..3 * t], &c[..]);
    let other = sample::generate(
        &mut four,
        &[&[] as &[u16]; 4],
        &SampleOptions { seed: 43, ..opts },
        0,
        |_, _| {},
    )
    .unwrap();
    assert_ne!(a, other);
}

#[test]
fn batched_generation_and_completion_prefixes_do_not_depend_on_the_batch() {
    let opts = SampleOptions {
        seed: 7,
        ..Default::default()
    };
    let t = 25;
    let originals: Vec<u16> = (0..2 * t).map(|i| (i % 5) as u16).collect();
    let prefixes = sample::completion_prefixes(&originals, t, 10, 3);
    assert_eq!(prefixes.len(), 6);
    assert_eq!(prefixes[4], originals[t..t + 10].to_vec());
    let mut seen = Vec::new();
    // Batches of four: the second is a short one (two images in a decoder of four).
    let four = sample::generate_all(&mut decoder(4), &prefixes, &opts, |d| seen.push(d)).unwrap();
    let one = sample::generate_all(&mut decoder(1), &prefixes, &opts, |_| {}).unwrap();
    assert_eq!(four, one);
    assert_eq!(four.len(), 6 * t);
    for (img, p) in four.chunks(t).zip(&prefixes) {
        assert_eq!(&img[..10], &p[..]);
    }
    assert_eq!(seen.last(), Some(&(6 * t as u64)));
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn completions_keep_their_prefix_and_rows_stream_in_order() {
    let mut dec = decoder(3);
    let prefix: Vec<u16> = (0..12).map(|i| (i % 9) as u16).collect();
    let mut rows = Vec::new();
    let toks = sample::generate(
        &mut dec,
        &[&prefix, &prefix[..5], &[]],
        &SampleOptions::default(),
        0,
        |r, so_far| {
            // Every row reported is complete for every image.
            rows.push((r, so_far[..(r + 1) * 5].to_vec()));
        },
    )
    .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(&toks[..12], &prefix[..]);
    assert_eq!(&toks[25..30], &prefix[..5]);
    assert_eq!(rows[4].1, toks[..25].to_vec());
    let err = sample::generate(
        &mut dec,
        &[&[0; 26], &[], &[]],
        &SampleOptions::default(),
        0,
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("longer than the image"), "{err}");
}

// ---- the commands ----

/// A tiny trained run on 6x6 images.
fn small_run(dir: &Path) -> PathBuf {
    let data = common::gray_npy(dir, 30, 6, |i| ((i * 37 + i / 36 * 11) % 256) as u8);
    let run = dir.join("run");
    let o = igpt(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "3",
        "--layers",
        "1",
        "--embd",
        "16",
        "--heads",
        "2",
        "--palette-size",
        "8",
        "--batch",
        "4",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run
}

#[test]
fn sample_complete_and_score_commands() {
    let dir = tempdir("cmds");
    let run = small_run(&dir);
    let out = dir.join("s.png");
    let npy = dir.join("s.npy");
    let o = igpt(&[
        "sample",
        "--model",
        s(&run),
        "--n",
        "5",
        "--batch",
        "2",
        "--out",
        s(&out),
        "--tokens",
        s(&npy),
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(image::open(&out).is_ok());
    let a = igpt::npy::read(&npy).unwrap();
    assert_eq!(a.shape, vec![5, 6, 6]);
    // Same seed, other batch size: the same tokens.
    let npy2 = dir.join("s2.npy");
    let o = igpt(&[
        "sample",
        "--model",
        s(&run),
        "--n",
        "5",
        "--batch",
        "5",
        "--out",
        s(&out),
        "--tokens",
        s(&npy2),
        "--seed",
        "3",
    ]);
    assert!(o.status.success());
    assert_eq!(a.data, igpt::npy::read(&npy2).unwrap().data);

    // Completions of real image files: an RGBA one of another size gets notices.
    let img = dir.join("rgba.png");
    image::RgbaImage::from_fn(9, 7, |x, y| {
        image::Rgba([(x * 20) as u8, (y * 30) as u8, 50, 200])
    })
    .save(&img)
    .unwrap();
    let c = dir.join("c.png");
    let o = igpt(&[
        "complete",
        "--model",
        s(&run),
        "--images",
        s(&img),
        "--k",
        "3",
        "--rows",
        "2",
        "--out",
        s(&c),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("alpha channel") && err.contains("resized"),
        "{err}"
    );
    let grid = image::open(&c).unwrap();
    assert!(grid.width() > 5 * grid.height() / 2, "one row of 5 tiles");

    // Bad inputs.
    let o = igpt(&[
        "complete",
        "--model",
        s(&run),
        "--images",
        s(&img),
        "--prefix-pixels",
        "37",
        "--out",
        s(&c),
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("longer than the image")
    );
    let broken = dir.join("broken.jpg");
    std::fs::write(&broken, b"\xff\xd8\xff junk").unwrap();
    let o = igpt(&[
        "complete",
        "--model",
        s(&run),
        "--images",
        s(&broken),
        "--out",
        s(&c),
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot decode image")
    );
    let no_palette = dir.join("nopal");
    std::fs::create_dir_all(&no_palette).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run.join(f), no_palette.join(f)).unwrap();
    }
    let o = igpt(&["sample", "--model", s(&no_palette), "--out", s(&out)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no palette.json"));

    // Scores: one per image, equal to the evaluation of that image alone.
    let csv = dir.join("scores.csv");
    let o = igpt(&[
        "score",
        "--model",
        s(&run),
        "--data",
        s(&dir.join("imgs.npy")),
        "--limit",
        "4",
        "--csv",
        s(&csv),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&csv).unwrap();
    let scores: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(scores.len(), 4);
    let m = igpt::checkpoint::LoadedModel::open(&run).unwrap();
    let set = igpt::data::load(s(&dir.join("imgs.npy")), igpt::data::Format::Auto).unwrap();
    let tokens = m.palette.encode(set.image(2));
    let mut e = Engine::new(m.model(), 1, false, &Device::Cpu).unwrap();
    e.set_params(&m.params).unwrap();
    let nll = e.forward(&tokens).unwrap() / 36.0;
    assert!((nll - scores[2]).abs() < 1e-5, "{nll} vs {}", scores[2]);
}

/// `sample_token` as it was written first: the whole palette sorted, then cut to k and p.
fn reference_token(logits: &[f32], opts: &SampleOptions, rng: &mut impl Rng) -> u16 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(f32, u16)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (((z - max) / opts.temperature).exp(), i as u16))
        .collect();
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if opts.top_k > 0 {
        probs.truncate(opts.top_k);
    }
    let total: f32 = probs.iter().map(|p| p.0).sum();
    let mut acc = 0.0;
    let keep = probs
        .iter()
        .position(|p| {
            acc += p.0 / total;
            acc >= opts.top_p
        })
        .map_or(probs.len(), |i| i + 1);
    probs.truncate(keep);
    let total: f32 = probs.iter().map(|p| p.0).sum();
    let mut u = rng.random::<f32>() * total;
    for &(p, id) in &probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs.iter().rev().find(|p| p.0 > 0.0).unwrap().1
}

#[test]
fn top_k_by_selection_draws_what_sorting_the_palette_draws() {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut probs = sample::SampleScratch::default();
    for case in 0..400u64 {
        // 512 colours; a few logits repeated so ties need the colour-index order.
        let mut logits: Vec<f32> = (0..512).map(|_| r.random::<f32>() * 6.0).collect();
        for i in 0..40 {
            logits[i * 7 + 3] = logits[i];
        }
        // Top-k alone, top-p alone (k 0: the whole palette ranked) and both; with neither,
        // the palette is drawn in colour order (the test above).
        let top_k = [2, 5, 40, 511, 0][case as usize % 5];
        let top_p = [1.0, 0.9, 0.5][case as usize % 3];
        let opts = SampleOptions {
            temperature: [0.7, 1.0, 1.3][case as usize % 3],
            top_k,
            top_p: if top_k == 0 && top_p == 1.0 {
                0.7
            } else {
                top_p
            },
            seed: 0,
        };
        let mut a = sample::image_rng(1, case);
        let mut b = sample::image_rng(1, case);
        for _ in 0..5 {
            let got = sample::sample_token(&logits, &opts, &mut a, &mut probs);
            assert_eq!(got, reference_token(&logits, &opts, &mut b), "{opts:?}");
        }
    }
}

/// A random source whose every number is 0: the draw lands on the first colour that can be
/// drawn.
struct Zeros;

impl rand::RngCore for Zeros {
    fn next_u32(&mut self) -> u32 {
        0
    }
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        dst.fill(0);
    }
}

#[test]
fn colours_of_no_probability_are_never_drawn() {
    let mut scratch = sample::SampleScratch::default();
    let mut draw = |logits: &[f32], opts: SampleOptions| {
        sample::sample_token(logits, &opts, &mut Zeros, &mut scratch)
    };
    let plain = SampleOptions::default();
    // A masked colour (−∞) first, with and without top-k and top-p.
    let masked = [f32::NEG_INFINITY, 0.0, 1.0];
    assert_eq!(draw(&masked, plain), 1);
    let top2 = SampleOptions { top_k: 2, ..plain };
    assert_eq!(
        draw(&masked, top2),
        2,
        "top-2 keeps colours 2 and 1, most likely first"
    );
    let top_p = SampleOptions {
        top_p: 0.99,
        ..plain
    };
    assert_eq!(draw(&masked, top_p), 2);
    // A colour 500 nats below the best at a low temperature underflows to no probability.
    let cold = SampleOptions {
        temperature: 0.01,
        ..plain
    };
    assert_eq!(draw(&[0.0, 5.0], cold), 1);
    // No colour can be drawn: the most likely one (an infinite logit), as when every logit is
    // −∞ or not a number.
    assert_eq!(draw(&[0.0, f32::INFINITY, 1.0], top2), 1);
    assert_eq!(draw(&[0.0, f32::INFINITY, 1.0], plain), 1);
    assert_eq!(draw(&[f32::NEG_INFINITY; 4], plain), 0);
    assert_eq!(draw(&[f32::NAN, 2.0, 1.0], plain), 1);
    // An empty palette draws nothing and does not panic.
    assert_eq!(draw(&[], top_p), 0);
}

/// Drawing from the whole palette, written plainly: each colour's weight from libm's
/// exponential, the draw walking the colours in order.
fn reference_whole_palette(logits: &[f32], temperature: f32, rng: &mut impl Rng) -> u16 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits
        .iter()
        .map(|&z| ((z - max) / temperature).exp())
        .collect();
    let mut u = rng.random::<f32>() * weights.iter().sum::<f32>();
    for (id, &w) in weights.iter().enumerate() {
        if u < w {
            return id as u16;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap() as u16
}

#[test]
fn drawing_from_the_whole_palette_follows_the_plain_definition() {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut scratch = sample::SampleScratch::default();
    let mut seen = [0usize; 512];
    for case in 0..400u64 {
        // Peaked and flat palettes, of the paper's size and of odd sizes (a SIMD tail).
        let v = [512, 9, 37][case as usize % 3];
        let spread = [2.0, 8.0, 20.0][case as usize % 3];
        let logits: Vec<f32> = (0..v).map(|_| r.random::<f32>() * spread).collect();
        let temperature = [1.0, 0.7, 1.3][case as usize % 3];
        let opts = SampleOptions {
            temperature,
            ..Default::default()
        };
        let mut a = sample::image_rng(2, case);
        let mut b = sample::image_rng(2, case);
        for _ in 0..5 {
            let got = sample::sample_token(&logits, &opts, &mut a, &mut scratch);
            assert_eq!(
                got,
                reference_whole_palette(&logits, temperature, &mut b),
                "case {case}"
            );
            seen[got as usize] += 1;
        }
    }
    // The draws spread over the palette rather than repeating one colour.
    assert!(seen.iter().filter(|&&n| n > 0).count() > 300, "{seen:?}");
}

#[test]
fn rows_drawn_on_many_threads_give_the_images_of_one_thread() {
    // Enough rows for the draws to be split among threads; some images dropped part-way
    // (decoder rows and their random streams move down).
    let opts = SampleOptions {
        seed: 5,
        top_k: 4,
        top_p: 0.9,
        temperature: 1.1,
    };
    let n = 40;
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let specs: Vec<sample::ImageSpec> = (0..n)
                .map(|i| sample::ImageSpec {
                    prefix: &[],
                    opts,
                    stream: i as u64,
                })
                .collect();
            sample::generate_images(&mut decoder(n), &specs, 0, |row, _, wanted| {
                if row == 1 {
                    for i in (0..n).step_by(3) {
                        wanted[i] = false;
                    }
                }
            })
            .unwrap()
            .tokens
        })
    };
    let one = run(1);
    assert_eq!(run(4), one);
    // A kept image is the image made alone.
    let t = 25;
    let alone = sample::generate(&mut decoder(1), &[&[]], &opts, 7, |_, _| {}).unwrap();
    assert_eq!(&one[7 * t..8 * t], &alone[..]);
}

#[test]
fn tokens_are_drawn_on_the_backend_and_fetched_once_a_row() {
    let calls = |p: &igpt::backend::profile::Profile, k: &str| {
        p.kernels()
            .iter()
            .find(|r| r.kernel == k)
            .map_or(0, |r| r.calls)
    };
    let opts = SampleOptions {
        seed: 4,
        top_k: 5,
        ..Default::default()
    };
    let (t, side) = (25, 5);
    // Unconditional images: every position is drawn on the backend, whose tokens feed the
    // next step there; the host fetches them after each row of pixels.
    let profile = igpt::backend::profile::Profile::start();
    let mut dec = decoder(3);
    let images = sample::generate(&mut dec, &[&[] as &[u16]; 3], &opts, 0, |_, _| {}).unwrap();
    assert_eq!(calls(&profile, "download"), 0, "no logits come to the host");
    assert_eq!(calls(&profile, "draw_tokens"), t as u64);
    assert_eq!(calls(&profile, "drawn_tokens"), (t / side) as u64);
    assert_eq!(
        calls(&profile, "set_tokens"),
        1,
        "only the first step's inputs"
    );
    assert_eq!(calls(&profile, "set_draws"), 1);
    drop(profile);
    // Each is the image drawn alone.
    for (i, image) in images.chunks(t).enumerate() {
        let alone = sample::generate(&mut decoder(1), &[&[]], &opts, i as u64, |_, _| {}).unwrap();
        assert_eq!(image, &alone[..], "image {i}");
    }

    // Completions of prefixes of 7 and 12 pixels: after the 7 both know, positions 7 to 11
    // are drawn on the host from the logits (image 1's pixels there are known), the rest on
    // the backend; each image is still the one completed alone.
    let prefixes: [&[u16]; 2] = [
        &[1, 2, 3, 4, 5, 6, 7],
        &[8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3],
    ];
    let profile = igpt::backend::profile::Profile::start();
    let mut dec = decoder(2);
    let both = sample::generate(&mut dec, &prefixes, &opts, 0, |_, _| {}).unwrap();
    assert_eq!(
        calls(&profile, "download"),
        5,
        "logits at positions 7 to 11"
    );
    assert_eq!(calls(&profile, "draw_tokens"), (t - 12) as u64);
    drop(profile);
    for (i, image) in both.chunks(t).enumerate() {
        let alone =
            sample::generate(&mut decoder(1), &[prefixes[i]], &opts, i as u64, |_, _| {}).unwrap();
        assert_eq!(image, &alone[..], "completion {i}");
        assert_eq!(&image[..prefixes[i].len()], prefixes[i]);
    }

    // And on the CPU the selftest's check of device draws against host draws passes.
    let check = igpt::selftest::check_device_draws(&Device::Cpu, 3).unwrap();
    assert!(check.passed && check.max_error == 0.0, "{check:?}");
}

#[test]
fn a_logit_that_is_not_a_number_draws_the_same_whatever_its_sign() {
    // A NaN's sign depends on the machine that computed it (x86 keeps an operand's, a GPU
    // makes its own): every NaN weight ranks first, so the top-k draw falls back to the argmax
    // either way, as the CUDA kernel's does.
    let mut scratch = sample::SampleScratch::default();
    let opts = SampleOptions {
        top_k: 3,
        ..Default::default()
    };
    let negative_nan = f32::from_bits(0xFFC0_0000);
    for nan in [f32::NAN, negative_nan] {
        let logits = [1.0, 3.0, 2.0, 0.5, 1.5, 2.5, nan, 0.1];
        for u in [0.0, 0.3, 0.9] {
            assert_eq!(
                sample::choose_token(&logits, &opts, u, &mut scratch),
                1,
                "NaN bits {:#x}, u {u}",
                nan.to_bits()
            );
        }
    }
}
