//! Hugging Face ImageGPT models: loading from safetensors and from PyTorch pickles, logits and
//! hidden states against what `transformers` computed (scripts/make_hf_fixtures.py), export.

mod common;

use common::tempdir;
use igpt::backend::Device;
use igpt::formats::{self, TensorSource};
use igpt::inference::{self, Convention};
use igpt::model::Output;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 2] = ["small-a", "small-b"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load(name: &str) -> Self {
        Self {
            bytes: std::fs::read(fixture(name).join("expected.safetensors")).unwrap(),
        }
    }
    fn get(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn ids(&self, key: &str) -> (usize, usize, Vec<i64>) {
        let (s, b) = self.get(key);
        let v = b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (s[0], s[1], v)
    }
    fn floats(&self, key: &str) -> Vec<f32> {
        let (_, b) = self.get(key);
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: max abs difference {worst} (scale {scale})"
    );
}

/// A directory with the fixture's configs and only the given weights file.
fn only_weights(name: &str, weights: &str, tag: &str) -> PathBuf {
    let dir = tempdir(&format!("hf-{name}-{tag}"));
    for f in ["config.json", "preprocessor_config.json", weights] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

fn check_model(dir: &Path, name: &str) {
    let m = formats::load_model(dir.to_str().unwrap()).unwrap();
    let exp = Expected::load(name);
    let n_layer = m.model().n_layer;

    let (n, t, raw) = exp.ids("raw_ids");
    let logits = inference::run(
        &m,
        &raw,
        n,
        t,
        Convention::Raw,
        Output::Logits,
        2,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert_close(&logits, &exp.floats("raw_logits"), 1e-4, "raw logits");
    for layer in [0, 1, n_layer] {
        let h = inference::run(
            &m,
            &raw,
            n,
            t,
            Convention::Raw,
            Output::Hidden(layer),
            3,
            &Device::Cpu,
            |_| {},
        )
        .unwrap();
        assert_close(
            &h,
            &exp.floats(&format!("raw_hidden_{layer}")),
            1e-4,
            &format!("hidden state {layer}"),
        );
    }
    let (n, t, pixels) = exp.ids("pixels");
    let logits = inference::run(
        &m,
        &pixels,
        n,
        t,
        Convention::Pixels,
        Output::Logits,
        2,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert_close(
        &logits,
        &exp.floats("sos_logits"),
        1e-4,
        "start-token logits",
    );
}

#[test]
fn safetensors_models_match_transformers() {
    for name in FIXTURES {
        check_model(&only_weights(name, "model.safetensors", "st"), name);
    }
}

#[test]
fn pytorch_pickles_match_transformers() {
    for name in FIXTURES {
        check_model(&only_weights(name, "pytorch_model.bin", "bin"), name);
    }
}

#[test]
fn both_weight_files_hold_the_same_parameters() {
    for name in FIXTURES {
        let a = formats::load_model(
            only_weights(name, "pytorch_model.bin", "b2")
                .to_str()
                .unwrap(),
        )
        .unwrap();
        let b = formats::load_model(
            only_weights(name, "model.safetensors", "s2")
                .to_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(a.params, b.params);
        assert_eq!(a.model(), b.model());
        assert_eq!(a.palette.exact_centers(), b.palette.exact_centers());
    }
}

#[test]
fn export_writes_what_transformers_wrote() {
    for name in FIXTURES {
        let m = formats::load_model(fixture(name).to_str().unwrap()).unwrap();
        let out = tempdir(&format!("hf-export-{name}"));
        formats::hf::export(&m, &out).unwrap();
        let ours = formats::SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
        let theirs =
            formats::SafetensorsFile::open(&fixture(name).join("model.safetensors")).unwrap();
        assert_eq!(ours.names(), theirs.names(), "{name}: tensor names");
        for t in theirs.names() {
            let shape = theirs.shape(&t).unwrap();
            assert_eq!(ours.shape(&t).unwrap(), shape, "{t}");
            assert_eq!(
                ours.read_vec(&t, &shape).unwrap(),
                theirs.read_vec(&t, &shape).unwrap(),
                "{t}"
            );
        }
        let back = formats::load_model(out.to_str().unwrap()).unwrap();
        assert_eq!(back.params, m.params);
        assert_eq!(back.palette.exact_centers(), m.palette.exact_centers());
    }
}
