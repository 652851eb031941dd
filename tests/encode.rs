//! Images to token ids: Pillow's BILINEAR resize pixel for pixel, and ids identical to Hugging
//! Face's ImageGPTImageProcessor (fixtures by scripts/make_encode_fixtures.py), on real photos
//! of several sizes and modes.

mod common;

use common::{igpt, s, stderr, tempdir};
use igpt::palette;
use igpt::preprocess;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn images() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(root().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().to_string(), p))
        .collect();
    v.sort();
    v
}

fn expected() -> Vec<u8> {
    std::fs::read(root().join("images/expected.safetensors")).unwrap()
}

#[test]
fn resize_matches_pillow_pixel_for_pixel() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let all = images();
    assert_eq!(all.len(), 6);
    let mut modes = std::collections::BTreeSet::new();
    for (name, path) in all {
        let img = image::open(&path).unwrap();
        modes.insert(format!("{:?}", img.color()));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let rgb = img.to_rgb8().into_raw();
        for side in [32, 8] {
            let ours = preprocess::resize_bilinear(&rgb, w, h, 3, side, side);
            let theirs = st.tensor(&format!("{name}_resized_{side}")).unwrap();
            // Lengths first: a short output would otherwise pass the comparison below.
            assert_eq!(ours.len(), side * side * 3, "{name} at {side}x{side}");
            assert_eq!(ours.len(), theirs.data().len(), "{name} at {side}x{side}");
            let differing = ours
                .iter()
                .zip(theirs.data())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{name} at {side}x{side}");
        }
    }
    // RGB, grayscale, palette (decoded to RGB) and RGBA files were all exercised.
    assert!(modes.len() >= 3, "{modes:?}");
}

#[test]
fn token_ids_match_the_hugging_face_processor() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for fixture in ["small-a", "small-b"] {
        let m = igpt::formats::load_model(s(&root().join("hf").join(fixture))).unwrap();
        let side = m.model().side;
        for (name, path) in images() {
            // The one image-to-tokens path every command takes.
            let img = preprocess::decode_file(&path).unwrap();
            let ids = preprocess::image_tokens(img.image(), side, &m.palette).unwrap();
            let ours: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            let theirs: Vec<i64> = st
                .tensor(&format!("{name}_ids_{fixture}"))
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(ours, theirs, "{name} for {fixture}");
        }
    }
}

/// The centre the processor's `color_quantize` picks, written out plainly (one centre at a
/// time, no screening, no lanes): the pixel normalised as `(level / 255 - 0.5) / 0.5` in
/// float32, `d = (|a|^2 - 2 a.b) + |b|^2` with `|a|^2` summed in float32 and the rest in
/// float64, each sum left to right, and the first centre among equal distances (`np.argmin`).
/// Also returns the plain squared distance `sum (a - b)^2` (float64) of the centre picked and
/// the smallest one, to show the rule is a nearest-centre rule.
fn processor_nearest(rgb: [u8; 3], centres: &[[f64; 3]]) -> (usize, f64, f64) {
    let a = rgb.map(|x| ((x as f64 * (1.0 / 255.0)) as f32 - 0.5) / 0.5);
    let a2 = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]) as f64;
    let a = a.map(f64::from);
    let (mut best, mut best_d, mut nearest) = (0, f64::INFINITY, f64::INFINITY);
    for (i, b) in centres.iter().enumerate() {
        let ab = a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
        let b2 = b[0] * b[0] + b[1] * b[1] + b[2] * b[2];
        let d = a2 - 2.0 * ab + b2;
        if d < best_d {
            (best, best_d) = (i, d);
        }
        nearest = nearest.min((0..3).map(|c| (a[c] - b[c]).powi(2)).sum());
    }
    let picked = (0..3).map(|c| (a[c] - centres[best][c]).powi(2)).sum();
    (best, picked, nearest)
}

/// `Palette::encode` itself on every one of the 2^24 RGB colours against [`processor_nearest`]:
/// the number of colours given another centre, and of colours not given a nearest one.
fn all_colours(palette: &palette::Palette, centres: &[[f64; 3]]) -> (usize, usize) {
    use rayon::prelude::*;
    assert_eq!(palette.len(), centres.len());
    // One red level per task: every (green, blue) pair.
    (0..=255u8)
        .into_par_iter()
        .map(|r| {
            let pixels: Vec<u8> = (0..=255u8)
                .flat_map(|g| (0..=255u8).flat_map(move |b| [r, g, b]))
                .collect();
            let ids = palette.encode(&pixels);
            assert_eq!(ids.len(), 1 << 16, "one id per pixel");
            let (mut wrong, mut far) = (0usize, 0usize);
            for (px, &id) in pixels.chunks_exact(3).zip(&ids) {
                let (want, picked, nearest) = processor_nearest([px[0], px[1], px[2]], centres);
                wrong += (id as usize != want) as usize;
                // Rounding may choose between near-equal centres, never a clearly farther one.
                far += (picked - nearest > 1e-12) as usize;
            }
            (wrong, far)
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[test]
fn the_quantiser_is_the_processor_s_on_all_2_24_colours() {
    let mut small_a = Vec::new();
    for fixture in ["small-a", "small-b"] {
        let dir = root().join("hf").join(fixture);
        let m = igpt::formats::load_model(s(&dir)).unwrap();
        // The centres as the processor reads them: float64 from preprocessor_config.json.
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("preprocessor_config.json")).unwrap())
                .unwrap();
        let centres: Vec<[f64; 3]> = cfg["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let c = c.as_array().unwrap();
                [0, 1, 2].map(|i| c[i].as_f64().unwrap())
            })
            .collect();
        assert_eq!(all_colours(&m.palette, &centres), (0, 0), "{fixture}");
        if fixture == "small-a" {
            small_a = centres;
        }
    }
    // The fixture palettes have no exact ties; this one has many. Each centre with red and
    // green swapped ties with it exactly wherever red equals green (the sums are the same
    // terms in the same order), and repeated centres tie everywhere they are nearest: the
    // first index must win each time.
    let mut ties = small_a.clone();
    ties.extend(small_a.iter().map(|c| [c[1], c[0], c[2]]));
    ties.extend_from_slice(&small_a[..4]);
    let flat: Vec<f64> = ties.iter().flatten().copied().collect();
    let p = palette::Palette::from_exact(3, flat).unwrap();
    assert_eq!(all_colours(&p, &ties), (0, 0), "palette with ties");
}

#[test]
fn normalisation_is_the_processors_for_every_level() {
    // (x / 255 - 0.5) / 0.5 in float32 equals x / 127.5 - 1 (older processors) at every level.
    for level in 0..=255u8 {
        let old = (level as f64 * (1.0 / 127.5)) as f32 - 1.0;
        assert_eq!(palette::normalise(level), old, "level {level}");
    }
    assert_eq!(palette::normalise(0), -1.0);
    assert_eq!(palette::normalise(255), 1.0);
}

/// The image decoder's limits follow IGPT_MAX_IMAGE_SIDE; a value that is not a number is
/// refused by name rather than ignored.
#[test]
fn decoder_limits_follow_the_environment() {
    let dir = tempdir("limits");
    let model = root().join("hf/small-a");
    let image = root().join("images/chelsea-rgb-131x97.png");
    let run = |side: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_igpt"))
            .env("IGPT_MAX_IMAGE_SIDE", side)
            .args(["encode", "--model", s(&model), s(&image), "--out"])
            .arg(dir.join("ids.npy"))
            .output()
            .unwrap()
    };
    let o = run("100");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("chelsea-rgb-131x97.png") && err.contains("100 pixels a side"),
        "{err}"
    );
    assert!(run("131").status.success(), "{}", stderr(&run("131")));
    let o = run("lots");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("IGPT_MAX_IMAGE_SIDE"), "{}", stderr(&o));
}

#[test]
fn encode_and_logits_commands_work_end_to_end() {
    let dir = tempdir("encode-cli");
    let model = root().join("hf/small-a");
    let ids = dir.join("ids.npy");
    let o = igpt(&[
        "encode",
        "--model",
        s(&model),
        s(&root().join("images")),
        "--out",
        s(&ids),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The RGBA and grayscale files are converted, and the user is told.
    assert!(stderr(&o).contains("alpha dropped"), "{}", stderr(&o));
    assert!(stderr(&o).contains("grayscale"), "{}", stderr(&o));
    let arr = igpt::npy::read(&ids).unwrap();
    assert_eq!(arr.shape, vec![6, 64]);

    let logits = dir.join("logits.npy");
    let o = igpt(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        s(&ids),
        "--out",
        s(&logits),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(igpt::npy::read(&logits).unwrap().shape, vec![6, 64, 16]);

    let hidden = dir.join("hidden.npy");
    let o = igpt(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        s(&ids),
        "--out",
        s(&hidden),
        "--raw",
        "--hidden",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(igpt::npy::read(&hidden).unwrap().shape, vec![6, 64, 32]);

    // A layer that does not exist, and ids outside the palette, are refused with the reason.
    let o = igpt(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        s(&ids),
        "--out",
        s(&hidden),
        "--hidden",
        "9",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("2 layers"), "{}", stderr(&o));
    let bad = dir.join("bad.npy");
    let data: Vec<u8> = [3i64, 16].iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(
        &bad,
        igpt::npy::encode(&[1, 2], igpt::npy::DType::I64, &data),
    )
    .unwrap();
    let o = igpt(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        s(&bad),
        "--out",
        s(&hidden),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("pixel ids must be in 0..16"),
        "{}",
        stderr(&o)
    );
    // In raw mode 16 is the start token and is accepted.
    let o = igpt(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        s(&bad),
        "--out",
        s(&hidden),
        "--raw",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn convert_round_trips_between_formats() {
    let dir = tempdir("convert");
    let hf = root().join("hf/small-b");
    let tf = root().join("tf/igpt-tiny-bert");
    // HF -> igpt run -> HF: the same parameters, and the run samples.
    let run = dir.join("run");
    let o = igpt(&["convert", "--model", s(&hf), "--to", "igpt", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let back = dir.join("hf-again");
    let o = igpt(&["convert", "--model", s(&run), "--to", "hf", s(&back)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = igpt::formats::load_model(s(&hf)).unwrap();
    let b = igpt::formats::load_model(s(&back)).unwrap();
    assert_eq!(a.params, b.params);
    let png = dir.join("samples.png");
    let o = igpt(&[
        "sample",
        "--model",
        s(&run),
        "--n",
        "2",
        "--out",
        s(&png),
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A BERT checkpoint becomes an igpt run that remembers its objective, but not an HF model.
    let bert_run = dir.join("bert-run");
    let o = igpt(&["convert", "--model", s(&tf), "--to", "igpt", s(&bert_run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = igpt::formats::load_model(s(&bert_run)).unwrap();
    assert_eq!(m.model().objective, igpt::config::Objective::Bert);
    let o = igpt(&[
        "convert",
        "--model",
        s(&tf),
        "--to",
        "hf",
        s(&dir.join("x")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("BERT"), "{}", stderr(&o));
    let o = igpt(&["sample", "--model", s(&bert_run), "--out", s(&png)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("BERT"), "{}", stderr(&o));
    // Never into a directory that holds something.
    let o = igpt(&["convert", "--model", s(&hf), "--to", "igpt", s(&run)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
}
