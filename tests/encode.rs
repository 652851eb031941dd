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
