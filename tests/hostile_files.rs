//! Malicious and broken checkpoints: each is refused with a clear error, nothing is executed,
//! nothing panics.

mod common;

use common::tempdir;
use igpt::formats::{self, pickle};
use std::io::Write;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(rel)
}

/// An HF directory with the fixture's configs and the given weights file contents.
fn hf_dir_with(tag: &str, weights_name: &str, weights: &[u8]) -> PathBuf {
    let dir = tempdir(&format!("hostile-{tag}"));
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("small-a").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join(weights_name), weights).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match formats::load_model(dir.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A PyTorch-style zip holding `data.pkl` and nothing else.
fn torch_zip(pickle: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pickle).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// `module.name(arg)` as protocol-2 pickle opcodes: GLOBAL, an argument tuple, REDUCE, STOP.
fn call_pickle(module: &str, name: &str, arg: &str) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'c'];
    p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    p.push(b'X');
    p.extend_from_slice(&(arg.len() as u32).to_le_bytes());
    p.extend_from_slice(arg.as_bytes());
    p.extend_from_slice(&[0x85, b'R', b'.']);
    p
}

#[test]
fn pickles_naming_foreign_globals_are_refused_unrun() {
    let marker = tempdir("hostile-marker").join("pwned");
    let cmd = format!("touch {}", marker.display());
    for (module, name) in [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("__builtin__", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ] {
        let p = call_pickle(module, name, &cmd);
        let err = pickle::read_state_dict(&p).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{module}.{name}`")),
            "{module}.{name}: {err}"
        );
        let dir = hf_dir_with("global", "pytorch_model.bin", &torch_zip(&p));
        let err = load_err(&dir);
        assert!(err.contains("refusing to load"), "{err}");
    }
    // STACK_GLOBAL (protocol 4) is checked the same way.
    let mut p = vec![0x80, 4, 0x8c, 2];
    p.extend_from_slice(b"os");
    p.extend_from_slice(&[0x8c, 6]);
    p.extend_from_slice(b"system");
    p.extend_from_slice(&[0x93, b'.']);
    assert!(
        pickle::read_state_dict(&p)
            .unwrap_err()
            .to_string()
            .contains("`os.system`")
    );
    assert!(!marker.exists(), "nothing may run");
}

#[test]
fn broken_pickles_and_zips_are_errors_not_panics() {
    let good = std::fs::read(fixture("small-a/pytorch_model.bin")).unwrap();
    // Truncated anywhere: the zip directory is gone or a storage is cut short.
    for cut in [10, 100, good.len() / 2, good.len() - 30, good.len() - 1] {
        let dir = hf_dir_with(&format!("cut{cut}"), "pytorch_model.bin", &good[..cut]);
        let err = load_err(&dir);
        assert!(err.contains("pytorch_model.bin"), "cut at {cut}: {err}");
    }
    // A flipped bit inside a storage: its CRC catches it.
    let mut flipped = good.clone();
    let at = {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(&good)).unwrap();
        let f = z.by_name("pytorch_model/data/1").unwrap();
        f.data_start().unwrap() as usize + 5
    };
    flipped[at] ^= 1;
    let err = load_err(&hf_dir_with("flip", "pytorch_model.bin", &flipped));
    assert!(
        err.contains("CRC") || err.contains("corrupt") || err.contains("invalid"),
        "{err}"
    );
    // Not a zip at all, and a legacy (pre-zip) pickle.
    let err = load_err(&hf_dir_with("text", "pytorch_model.bin", b"hello world"));
    assert!(err.contains("not a readable PyTorch checkpoint"), "{err}");
    let err = load_err(&hf_dir_with(
        "legacy",
        "pytorch_model.bin",
        &[0x80, 2, b'.'],
    ));
    assert!(err.contains("legacy"), "{err}");

    // Mutations of a real data.pkl never panic (a small fuzz run inside the suite).
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&good)).unwrap();
    let name = z
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .unwrap()
        .to_string();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut pkl).unwrap();
    assert!(pickle::read_state_dict(&pkl).is_ok());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut m = pkl.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % m.len();
            m[i] = next() as u8;
        }
        if next() % 5 == 0 {
            m.truncate((next() as usize) % m.len());
        }
        let _ = pickle::read_state_dict(&m);
    }
}

#[test]
fn safetensors_headers_that_lie_are_refused() {
    let good = std::fs::read(fixture("small-a/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
    let with_header = |h: &str| -> Vec<u8> {
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&good[8 + n..]);
        out
    };
    // Offsets beyond the data.
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let mut lie = v.clone();
    lie["lm_head.weight"]["data_offsets"][1] = serde_json::json!(10_000_000);
    let err = load_err(&hf_dir_with(
        "offsets",
        "model.safetensors",
        &with_header(&lie.to_string()),
    ));
    assert!(err.contains("not a valid safetensors file"), "{err}");
    // A shape whose size does not match its bytes.
    let mut lie = v.clone();
    lie["lm_head.weight"]["shape"] = serde_json::json!([16, 33]);
    let err = load_err(&hf_dir_with(
        "shape",
        "model.safetensors",
        &with_header(&lie.to_string()),
    ));
    assert!(err.contains("not a valid safetensors file"), "{err}");
    // A header length larger than the file, and a file cut short.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = load_err(&hf_dir_with("len", "model.safetensors", &huge));
    assert!(err.contains("not a valid safetensors file"), "{err}");
    let err = load_err(&hf_dir_with(
        "short",
        "model.safetensors",
        &good[..good.len() - 100],
    ));
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn weights_that_do_not_fit_the_config_name_the_tensor() {
    let dir = tempdir("hostile-config");
    for f in ["preprocessor_config.json", "model.safetensors"] {
        std::fs::copy(fixture("small-a").join(f), dir.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(fixture("small-a/config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"n_embd\": 32", "\"n_embd\": 64"),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("transformer.wte.weight") && err.contains("[17, 64]"),
        "{err}"
    );
    // A palette of the wrong size for the model.
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    let pre = std::fs::read_to_string(fixture("small-a/preprocessor_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&pre).unwrap();
    v["clusters"].as_array_mut().unwrap().pop();
    std::fs::write(dir.join("preprocessor_config.json"), v.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("15 clusters"), "{err}");
    // Settings the model family does not have.
    std::fs::copy(
        fixture("small-a/preprocessor_config.json"),
        dir.join("preprocessor_config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"quick_gelu\"", "\"relu\""),
    )
    .unwrap();
    assert!(load_err(&dir).contains("quick_gelu"));
}

#[test]
fn non_zero_biases_are_refused() {
    let st = formats::SafetensorsFile::open(&fixture("small-a/model.safetensors")).unwrap();
    use formats::TensorSource;
    let mut tensors = Vec::new();
    for name in st.names() {
        let shape = st.shape(&name).unwrap();
        let mut v = st.read_vec(&name, &shape).unwrap();
        if name == "transformer.h.1.mlp.c_fc.bias" {
            v[3] = 0.5;
        }
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let err = load_err(&hf_dir_with("bias", "model.safetensors", &bytes));
    assert!(
        err.contains("transformer.h.1.mlp.c_fc.bias is not zero"),
        "{err}"
    );
}
