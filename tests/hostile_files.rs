//! Malicious and broken checkpoints: each is refused with a clear error, nothing is executed,
//! nothing panics.

mod common;

use common::{Rng, idx_bytes, tempdir};
use igpt::formats::{self, TensorSource, pickle};
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

/// A fixed-seed stream of random numbers (xorshift), the same on every run.
/// The fixture's `pytorch_model.bin` with its `data.pkl` replaced (storages kept).
fn torch_zip_with_pickle(good: &[u8], pkl: &[u8]) -> Vec<u8> {
    let mut src = zip::ZipArchive::new(std::io::Cursor::new(good)).unwrap();
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for i in 0..src.len() {
            let mut f = src.by_index(i).unwrap();
            let name = f.name().unwrap().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).unwrap();
            z.start_file(&name, opts).unwrap();
            z.write_all(if name.ends_with("data.pkl") {
                pkl
            } else {
                &data
            })
            .unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn fixture_pickle(good: &[u8]) -> Vec<u8> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(good)).unwrap();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("pytorch_model/data.pkl").unwrap(), &mut pkl)
        .unwrap();
    pkl
}

/// Reads every tensor of a source (those of a plausible size), as loading a model does.
fn read_all(src: &dyn formats::TensorSource) -> (usize, Vec<String>) {
    let (mut ok, mut errs) = (0, Vec::new());
    for name in src.names() {
        let Some(shape) = src.shape(&name) else {
            continue;
        };
        let Some(n) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            continue;
        };
        if n > 1 << 20 {
            continue;
        }
        match src.read_into(&name, &mut vec![0.0; n]) {
            Ok(()) => ok += 1,
            Err(e) => errs.push(format!("{e:#}")),
        }
    }
    (ok, errs)
}

#[test]
fn a_stride_whose_reach_overflows_is_refused() {
    use formats::{Bytes, pickle::TorchZip};
    let good = std::fs::read(fixture("small-a/pytorch_model.bin")).unwrap();
    let pkl = fixture_pickle(&good);
    // wte [17, 32] has stride (32, 1): make it (2^60, 1). The saturated 16 * 2^60 plus 31
    // wraps to 30, inside the 544-element storage, if the reach is summed in 64 bits.
    let at = pkl
        .windows(5)
        .position(|w| w == [b'K', 32, b'K', 1, 0x86])
        .expect("wte's stride tuple");
    let mut evil = pkl[..at].to_vec();
    evil.extend_from_slice(&[0x8a, 8]);
    evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
    evil.extend_from_slice(&pkl[at + 2..]);
    let z = TorchZip::from_bytes(
        Path::new("evil.bin"),
        Bytes::Owned(torch_zip_with_pickle(&good, &evil)),
    )
    .unwrap();
    let err = z
        .read_into("transformer.wte.weight", &mut [0.0; 17 * 32])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("evil.bin") && err.contains("reaches element"),
        "{err}"
    );
}

#[test]
fn thousands_of_mutated_pytorch_checkpoints_load_or_fail_cleanly() {
    use formats::{Bytes, pickle::TorchZip};
    let good = std::fs::read(fixture("small-a/pytorch_model.bin")).unwrap();
    let pkl = fixture_pickle(&good);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut opened, mut read) = (0, 0);
    for _ in 0..3000 {
        let m = rng.mutate(&pkl, 2);
        let Ok(z) = TorchZip::from_bytes(
            Path::new("mutant.bin"),
            Bytes::Owned(torch_zip_with_pickle(&good, &m)),
        ) else {
            continue;
        };
        opened += 1;
        let (ok, errs) = read_all(&z);
        read += ok;
        for e in errs {
            assert!(e.contains("mutant.bin"), "an error that names no file: {e}");
        }
    }
    // The mutations reach the tensor reads, strided ones included, not only the unpickler.
    assert!(opened > 100 && read > 3000, "opened {opened}, read {read}");
}

#[test]
fn thousands_of_mutated_tf_indexes_and_shards_load_or_fail_cleanly() {
    use formats::{Bytes, tf};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tf/igpt-tiny");
    let index = std::fs::read(dir.join("model.ckpt-1000.index")).unwrap();
    let shards: Vec<Vec<u8>> = (0..3)
        .map(|s| std::fs::read(dir.join(format!("model.ckpt-1000.data-{s:05}-of-00003"))).unwrap())
        .collect();
    let prefix = dir.join("model.ckpt-1000");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut read = 0;
    for i in 0..2000 {
        // Half the mutants have a damaged index, half a damaged shard.
        let (idx, sh) = if i % 2 == 0 {
            (rng.mutate(&index, 0), shards.clone())
        } else {
            let k = (rng.next() % 3) as usize;
            let mut s = shards.clone();
            s[k] = rng.mutate(&shards[k], 0);
            (index.clone(), s)
        };
        let Ok((n, entries)) = tf::parse_index(&idx) else {
            continue;
        };
        if n != 3 {
            continue;
        }
        let b =
            tf::Bundle::from_parts(&prefix, entries, sh.into_iter().map(Bytes::Owned).collect());
        read += read_all(&b).0;
    }
    assert!(read > 1000, "only {read} tensors read");
    // A changed byte inside a shard is always caught by the tensor's CRC-32C.
    let (_, entries) = tf::parse_index(&index).unwrap();
    let (name, e) = entries
        .iter()
        .find(|(_, e)| e.size > 0 && e.masked_crc.is_some())
        .unwrap();
    let mut s = shards.clone();
    s[e.shard][e.offset as usize + 1] ^= 0x10;
    let b = tf::Bundle::from_parts(
        &prefix,
        entries.clone(),
        s.into_iter().map(Bytes::Owned).collect(),
    );
    let shape = b.shape(name).unwrap();
    let err = b
        .read_into(name, &mut vec![0.0; shape.iter().product()])
        .unwrap_err();
    assert!(format!("{err:#}").contains("CRC"), "{err:#}");
}

/// A small igpt model of one layer and its run directory.
fn small_run(
    tag: &str,
) -> (
    igpt::config::ModelConfig,
    igpt::checkpoint::RunDir,
    Vec<f32>,
) {
    let cfg = igpt::config::ModelConfig {
        n_layer: 1,
        n_embd: 16,
        n_head: 2,
        n_vocab: 8,
        side: 4,
        channels: 1,
        objective: Default::default(),
    };
    let run = igpt::checkpoint::RunDir::create(&tempdir(tag)).unwrap();
    let params = igpt::model::init_params(&cfg, 3);
    run.save_model(&cfg, &params).unwrap();
    (cfg, run, params)
}

#[test]
fn thousands_of_mutated_model_files_load_or_fail_cleanly_and_data_damage_is_caught() {
    let (cfg, run, params) = small_run("mut-st");
    let path = run.file("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    assert_eq!(
        igpt::checkpoint::load_model_file(&path, &cfg).unwrap(),
        params
    );
    let data_start = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut caught = 0;
    for _ in 0..2000 {
        let m = rng.mutate(&good, 0);
        std::fs::write(&path, &m).unwrap();
        let r = igpt::checkpoint::load_model_file(&path, &cfg);
        if let Err(e) = &r {
            assert!(format!("{e:#}").contains("model.safetensors"), "{e:#}");
        }
        // Any change to the tensors' bytes (the file's length kept) must be refused.
        if m.len() == good.len() && m[data_start..] != good[data_start..] {
            assert!(r.is_err(), "damaged tensor data loaded");
            caught += 1;
        }
    }
    assert!(caught > 1000, "{caught}");
}

#[test]
fn checkpoints_carry_checksums_and_old_ones_still_load() {
    let (cfg, run, params) = small_run("crc");
    let n = params.len();
    let m: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
    let v: Vec<f32> = (0..n).map(|i| i as f32 * 1e-6).collect();
    let state = igpt::train::TrainState {
        step: 7,
        epoch: 1,
        cursor: 3,
        tokens_seen: 99,
    };
    run.save_trainer(&state, n, |i, buf| {
        buf.clear();
        buf.extend_from_slice([&params, &m, &v][i]);
    })
    .unwrap();
    let (s, p2, m2, v2) = run.load_trainer(n).unwrap();
    assert_eq!((s, &p2, &m2, &v2), (state.clone(), &params, &m, &v));
    // One flipped bit anywhere in a tensor or in the training state is refused, naming the file.
    let tp = run.file("trainer.safetensors");
    let good = std::fs::read(&tp).unwrap();
    let hl = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // The tensors lie in the file in the order written: params, adam_m, adam_v.
    for (at, tensor) in [
        (8 + hl + 5, "params"),
        (8 + hl + 4 * n + 2, "adam_m"),
        (good.len() - 1, "adam_v"),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        std::fs::write(&tp, &bad).unwrap();
        let err = format!("{:#}", run.load_trainer(n).unwrap_err());
        assert!(
            err.contains("trainer.safetensors")
                && err.contains("checksum")
                && err.contains(&format!("tensor {tensor}")),
            "{err}"
        );
    }
    let header = String::from_utf8(good[8..8 + hl].to_vec()).unwrap();
    let at = 8 + header.find("\\\"cursor\\\":3").unwrap() + 11;
    let mut bad = good.clone();
    bad[at] = b'4';
    std::fs::write(&tp, &bad).unwrap();
    let err = format!("{:#}", run.load_trainer(n).unwrap_err());
    assert!(err.contains("its metadata does not match"), "{err}");
    // The model file too.
    let mp = run.file("model.safetensors");
    let mut bad = std::fs::read(&mp).unwrap();
    let last = bad.len() - 3;
    bad[last] ^= 0x01;
    std::fs::write(&mp, &bad).unwrap();
    let err = format!(
        "{:#}",
        igpt::checkpoint::load_model_file(&mp, &cfg).unwrap_err()
    );
    assert!(
        err.contains("model.safetensors") && err.contains("checksum"),
        "{err}"
    );
    // A checkpoint written before checksums existed (no table) loads as it is.
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&good).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    assert!(meta.remove(igpt::checkpoint::CHECKSUMS).is_some());
    let old = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
    std::fs::write(&tp, &old).unwrap();
    assert_eq!(run.load_trainer(n).unwrap(), (state, params, m, v));
}

#[test]
fn a_saved_state_beyond_the_data_or_the_run_is_refused() {
    use igpt::train::run;
    let dir = tempdir("cursor");
    let run_dir = igpt::checkpoint::RunDir::create(&dir).unwrap();
    let pixels: Vec<u8> = (0..12 * 16).map(|i| (i * 7 % 256) as u8).collect();
    let images = igpt::data::ImageSet {
        height: 4,
        width: 4,
        channels: 1,
        pixels,
        labels: None,
        class_names: vec![],
    };
    let npy = dir.join("x.npy");
    std::fs::write(
        &npy,
        igpt::npy::encode(&[12, 4, 4], igpt::npy::DType::U8, &images.pixels),
    )
    .unwrap();
    let spec = run::DataSpec {
        data: npy.to_str().unwrap().into(),
        format: igpt::data::Format::Auto,
        side: None,
        channels: None,
        val_data: None,
        val_fraction: 0.25,
        limit: None,
        seed: 0,
    };
    let fit = run::PaletteSpec::Fit(igpt::palette::FitOptions {
        k: 4,
        ..Default::default()
    });
    let prepared = run::prepare(&run_dir, &spec, &fit, &mut run::Quiet).unwrap();
    let (cfg, _, _) = small_run("cursor-model");
    let cfg = igpt::config::ModelConfig { n_vocab: 4, ..cfg };
    let tc = igpt::train::TrainConfig {
        steps: 2,
        batch: 2,
        micro_batch: 2,
        warmup: 1,
        eval_every: 2,
        ..Default::default()
    };
    let dev = igpt::backend::Device::default();
    run::start(
        &run_dir,
        &cfg,
        &tc,
        &prepared,
        "x",
        None,
        &dev,
        igpt::parallel::Single::team(),
        &mut run::Quiet,
    )
    .unwrap();
    drop(run_dir);
    let n = cfg.n_params();
    let reopen = || igpt::checkpoint::RunDir::open(&dir).unwrap();
    let (state, p, m, v) = reopen().load_trainer(n).unwrap();
    for bad in [
        igpt::train::TrainState {
            cursor: usize::MAX,
            ..state.clone()
        },
        igpt::train::TrainState {
            step: u64::MAX,
            ..state.clone()
        },
    ] {
        let r = reopen();
        r.save_trainer(&bad, n, |i, buf| {
            buf.clear();
            buf.extend_from_slice([&p, &m, &v][i]);
        })
        .unwrap();
        let err = format!(
            "{:#}",
            run::resume(
                &r,
                Some(4),
                None,
                None,
                &dev,
                igpt::parallel::Single::team(),
                &mut run::Quiet
            )
            .unwrap_err()
        );
        assert!(
            err.contains("trainer.safetensors") && err.contains("does not fit"),
            "{err}"
        );
        // Refused before anything changed: the run still plans its 2 steps.
        assert_eq!(r.load_config().unwrap().train.steps, 2);
    }
}

#[test]
fn sizes_in_headers_that_overflow_are_refused() {
    // A token cache whose header length overflows 16 + length.
    let dir = tempdir("hdr");
    let p = dir.join("x.tokens");
    let mut b = b"IGPTTOK1".to_vec();
    b.extend_from_slice(&(u64::MAX - 8).to_le_bytes());
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    let err = format!("{:#}", igpt::data::TokenSet::open(&p).unwrap_err());
    assert!(
        err.contains("x.tokens") && err.contains("truncated header"),
        "{err}"
    );
    // A header whose image count times size overflows.
    let h = br#"{"n":4611686018427387904,"t":8,"n_vocab":4,"labelled":true,"fingerprint":"f"}"#;
    let mut b = b"IGPTTOK1".to_vec();
    b.extend_from_slice(&(h.len() as u64).to_le_bytes());
    b.extend_from_slice(h);
    std::fs::write(&p, &b).unwrap();
    let err = format!("{:#}", igpt::data::TokenSet::open(&p).unwrap_err());
    assert!(err.contains("truncated"), "{err}");
    // A .npy whose shape product overflows: not one image.
    let mut npy = igpt::npy::encode(&[1, 2, 2], igpt::npy::DType::U8, &[0; 4]);
    let from = npy.windows(9).position(|w| w == b"(1, 2, 2)").unwrap();
    let big = "(4294967296, 4294967296, 4)";
    let header_end = npy.iter().position(|&c| c == b'\n').unwrap();
    npy.splice(from..from + 9, big.bytes());
    // Keep the header length field right (version 1: u16 at 8).
    let hl = (header_end + big.len() - 9 + 1 - 10) as u16;
    npy[8..10].copy_from_slice(&hl.to_le_bytes());
    let err = format!("{:#}", igpt::npy::parse(&npy).unwrap_err());
    assert!(err.contains("larger than any array"), "{err}");
    // IDX dimensions whose product overflows.
    let idx = idx_bytes(&[u32::MAX; 4], &[], 8);
    let err = format!("{:#}", igpt::data::idx::parse(&idx, "big.idx").unwrap_err());
    assert!(
        err.contains("big.idx") && err.contains("larger than any file"),
        "{err}"
    );
}

#[test]
fn thousands_of_mutated_data_files_and_token_caches_load_or_fail_cleanly() {
    use igpt::data::{TokenSet, cifar, idx};
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    // IDX images and labels.
    let images = idx_bytes(&[5, 4, 4], &(0..80).collect::<Vec<u8>>(), 8);
    let labels = idx_bytes(&[5], &[1, 2, 3, 4, 5], 8);
    assert!(idx::load_bytes(&images, "imgs", Some(&labels)).is_ok());
    for i in 0..3000 {
        let (a, b) = if i % 2 == 0 {
            (rng.mutate(&images, 0), labels.clone())
        } else {
            (images.clone(), rng.mutate(&labels, 0))
        };
        if let Err(e) = idx::load_bytes(&a, "imgs", Some(&b)) {
            assert!(format!("{e:#}").contains("imgs"), "{e:#}");
        }
    }
    // CIFAR-10 and CIFAR-100 records.
    let rec: Vec<u8> = (0..2 * 3074).map(|i| (i * 13 % 256) as u8).collect();
    for i in 0..2000 {
        let m = rng.mutate(&rec, 0);
        if let Ok(s) = cifar::from_bytes(&m, i % 2 == 0, "batch.bin") {
            assert_eq!(s.pixels.len(), s.len() * 3072);
        }
    }
    // NPY arrays.
    let npy = igpt::npy::encode(&[3, 4, 4], igpt::npy::DType::U8, &[7; 48]);
    for _ in 0..3000 {
        if let Ok(a) = igpt::npy::parse(&rng.mutate(&npy, 0)) {
            assert_eq!(a.data.len(), a.len() * a.dtype.size());
        }
    }
    // Token caches: every image and label of a cache that opens can be read.
    let dir = tempdir("mut-tok");
    let p = dir.join("m.tokens");
    let set = TokenSet::from_tokens(
        (0..6 * 9).map(|i| i % 5).collect(),
        9,
        5,
        Some(vec![0, 1, 2, 3, 4, 5]),
    )
    .unwrap();
    set.save(&p).unwrap();
    let good = std::fs::read(&p).unwrap();
    let mut opened = 0;
    for _ in 0..2000 {
        std::fs::write(&p, rng.mutate(&good, 0)).unwrap();
        match TokenSet::open(&p) {
            Ok(t) => {
                opened += 1;
                let mut buf = vec![0u16; t.header.t];
                for i in 0..t.len() {
                    t.copy_image(i, &mut buf);
                    assert!(buf.iter().all(|&x| (x as usize) < t.header.n_vocab));
                    let _ = t.label(i);
                }
            }
            Err(e) => assert!(format!("{e:#}").contains("m.tokens"), "{e:#}"),
        }
    }
    assert!(opened > 20, "{opened}");
}

#[test]
fn image_bombs_and_endless_files_are_refused() {
    let dir = tempdir("bomb");
    // A PNG that declares 20000 x 20000 pixels in a few bytes.
    let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        c.extend_from_slice(&h.finalize().to_be_bytes());
        c
    };
    let mut ihdr = 20000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    let p = dir.join("bomb.png");
    std::fs::write(&p, &png).unwrap();
    let err = format!("{:#}", igpt::preprocess::decode_file(&p).err().unwrap());
    assert!(err.contains("bomb.png") && err.contains("limits"), "{err}");
    // A FIFO and a device are refused by what they are, not read.
    let fifo = dir.join("pipe.npy");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let zero = dir.join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let checks: Vec<(&Path, String)> = vec![
        (&fifo, format!("{:#}", igpt::npy::read(&fifo).unwrap_err())),
        (
            &fifo,
            format!("{:#}", igpt::preprocess::decode_file(&fifo).err().unwrap()),
        ),
        (
            &zero,
            format!("{:#}", igpt::palette::Palette::load(&zero).unwrap_err()),
        ),
        (
            &zero,
            format!("{:#}", igpt::data::TokenSet::open(&zero).unwrap_err()),
        ),
        (
            &fifo,
            format!(
                "{:#}",
                igpt::data::load(fifo.to_str().unwrap(), igpt::data::Format::Npy).unwrap_err()
            ),
        ),
    ];
    for (f, err) in checks {
        assert!(
            err.contains(&f.display().to_string()) && err.contains("not a regular file"),
            "{err}"
        );
    }
}

#[test]
fn mnist_labels_are_found_under_either_naming() {
    let dir = tempdir("mnist-names");
    let images = idx_bytes(&[3, 2, 2], &[9; 12], 8);
    let labels = idx_bytes(&[3], &[4, 5, 6], 8);
    for (img, lab) in [
        ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ("x-images.idx3-ubyte", "x-labels-idx1-ubyte.gz"),
    ] {
        std::fs::write(dir.join(img), &images).unwrap();
        let lp = dir.join(lab);
        if lab.ends_with(".gz") {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&labels).unwrap();
            std::fs::write(&lp, gz.finish().unwrap()).unwrap();
        } else {
            std::fs::write(&lp, &labels).unwrap();
        }
        let set =
            igpt::data::load(dir.join(img).to_str().unwrap(), igpt::data::Format::Auto).unwrap();
        assert_eq!(set.labels, Some(vec![4, 5, 6]), "{img}");
    }
    // Both namings are among the names tried.
    let tried = igpt::data::idx::label_candidates(&dir.join("a-images.idx3-ubyte.gz"));
    for name in ["a-labels.idx1-ubyte", "a-labels-idx1-ubyte.gz"] {
        assert!(tried.contains(&dir.join(name)), "{tried:?}");
    }
    // And a message about missing labels says where it looked.
    let said = igpt::data::labels_tried(dir.join("a-images.idx3-ubyte.gz").to_str().unwrap());
    assert!(
        said.contains("a-labels.idx1-ubyte") && said.contains("a-labels-idx1-ubyte.gz"),
        "{said}"
    );
    // A labels file named outright.
    std::fs::write(dir.join("other.lbl"), &labels).unwrap();
    let set = igpt::data::idx::load(
        &dir.join("t10k-images-idx3-ubyte"),
        Some(&dir.join("other.lbl")),
    )
    .unwrap();
    assert_eq!(set.labels, Some(vec![4, 5, 6]));
}
