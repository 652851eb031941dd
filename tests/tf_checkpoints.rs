//! OpenAI TensorFlow checkpoints written by TensorFlow (scripts/make_tf_fixtures.py): the
//! tensor-bundle reader, the variable mapping, and the logits of both objectives against a
//! float64 reference of the official model.

mod common;

use common::tempdir;
use igpt::backend::Device;
use igpt::config::Objective;
use igpt::formats::{self, TensorSource, tf};
use igpt::inference::{self, Convention};
use igpt::model::Output;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tf")
        .join(name)
}

fn expected(name: &str) -> (usize, usize, Vec<i64>, Vec<i64>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ints = |k: &str| -> Vec<i64> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let shape = st.tensor("pixels").unwrap().shape().to_vec();
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape[0], shape[1], ints("pixels"), ints("mask"), logits)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn autoregressive_checkpoint_matches_the_reference() {
    let dir = fixture("igpt-tiny");
    // A directory, a prefix and an index path all name the same checkpoint.
    for spec in [
        dir.clone(),
        dir.join("model.ckpt-1000"),
        dir.join("model.ckpt-1000.index"),
    ] {
        let m = formats::load_model(spec.to_str().unwrap()).unwrap();
        assert_eq!(m.model().objective, Objective::Autoregressive);
        assert_eq!(
            (m.model().n_layer, m.model().n_embd, m.model().n_head),
            (2, 32, 4)
        );
        assert_eq!((m.model().side, m.model().n_vocab), (6, 16));
        let (n, t, pixels, _, want) = expected("igpt-tiny");
        let got = inference::run(
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
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "max logit difference {d}");
    }
}

#[test]
fn bert_checkpoint_runs_bidirectionally_with_masked_inputs() {
    let m = formats::load_model(fixture("igpt-tiny-bert").to_str().unwrap()).unwrap();
    assert_eq!(m.model().objective, Objective::Bert);
    let (n, t, pixels, mask, want) = expected("igpt-tiny-bert");
    assert!(mask.contains(&1), "the fixture masks some pixels");
    let ids: Vec<i64> = pixels
        .iter()
        .zip(&mask)
        .map(|(&p, &m)| if m == 1 { -1 } else { p })
        .collect();
    let got = inference::run(
        &m,
        &ids,
        n,
        t,
        Convention::Pixels,
        Output::Logits,
        3,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "max logit difference {d}");
    // Without the mask the outputs differ: the masked positions really were zeroed.
    let unmasked = inference::run(
        &m,
        &pixels,
        n,
        t,
        Convention::Pixels,
        Output::Logits,
        3,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert!(max_diff(&unmasked, &want) > 1e-2);
    // BERT models see whole images only.
    let err = inference::run(
        &m,
        &ids[..t - 1],
        1,
        t - 1,
        Convention::Pixels,
        Output::Logits,
        1,
        &Device::Cpu,
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("whole images"), "{err}");
}

#[test]
fn optimizer_slots_and_shards_are_read_but_not_used() {
    let b = tf::Bundle::open(&fixture("igpt-tiny").join("model.ckpt-1000")).unwrap();
    let names = b.names();
    assert!(names.contains(&"model/wte/Adam".to_string()));
    assert!(names.contains(&"global_step".to_string()));
    assert_eq!(b.shape("model/h1/attn/q_proj").unwrap(), vec![4, 8, 32]);
    // Variables live in more than one data shard.
    let shards: std::collections::BTreeSet<usize> =
        names.iter().map(|n| b.entry(n).unwrap().shard).collect();
    assert!(shards.len() >= 2, "{shards:?}");
}

fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dir = tempdir(&format!("tf-{tag}"));
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match formats::load_model(dir.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn corrupt_checkpoints_are_refused_with_a_reason() {
    // A flipped byte in the data: the tensor's CRC-32C catches it.
    let dir = copy_fixture("igpt-tiny", "bad-data");
    let shard = dir.join("model.ckpt-1000.data-00001-of-00003");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    assert!(load_err(&dir).contains("CRC-32C"), "{}", load_err(&dir));

    // A flipped byte in the index: the block checksum catches it.
    let dir = copy_fixture("igpt-tiny", "bad-index");
    let index = dir.join("model.ckpt-1000.index");
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&index, bytes).unwrap();
    assert!(load_err(&dir).contains("CRC-32C"), "{}", load_err(&dir));

    // A truncated index, a missing shard, a missing palette.
    let dir = copy_fixture("igpt-tiny", "short-index");
    let index = dir.join("model.ckpt-1000.index");
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() - 10]).unwrap();
    assert!(load_err(&dir).contains("magic"), "{}", load_err(&dir));

    let dir = copy_fixture("igpt-tiny", "no-shard");
    std::fs::remove_file(dir.join("model.ckpt-1000.data-00002-of-00003")).unwrap();
    assert!(load_err(&dir).contains("missing"), "{}", load_err(&dir));

    let dir = copy_fixture("igpt-tiny", "no-palette");
    std::fs::remove_file(dir.join("kmeans_centers.npy")).unwrap();
    assert!(
        load_err(&dir).contains("kmeans_centers.npy"),
        "{}",
        load_err(&dir)
    );

    // A palette of the wrong size for the checkpoint.
    let dir = copy_fixture("igpt-tiny", "bad-palette");
    let arr = igpt::npy::encode_f32(&[8, 3], &[0.0; 24]);
    std::fs::write(dir.join("kmeans_centers.npy"), &arr).unwrap();
    assert!(load_err(&dir).contains("16 colours"), "{}", load_err(&dir));
}
