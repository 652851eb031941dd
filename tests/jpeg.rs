//! JPEG files decoded exactly as Pillow decodes them (`Image.open(f).convert("RGB")`, with
//! libjpeg-turbo), and the ids of Hugging Face's ImageGPTImageProcessor on them (fixtures by
//! scripts/make_jpeg_fixtures.py); truncated, damaged and oversized JPEGs refused by name.

mod common;

use common::{Rng, igpt, s, stderr, tempdir};
use igpt::preprocess::{self, DecodeLimits};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture JPEGs, sorted by name (as `igpt encode` reads a folder).
fn jpegs() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(root().join("jpeg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().to_string(), p))
        .collect();
    v.sort();
    assert_eq!(v.len(), 12, "the fixture JPEGs");
    v
}

fn expected() -> Vec<u8> {
    std::fs::read(root().join("jpeg/expected.safetensors")).unwrap()
}

/// Pillow's RGB of fixture `name`: (width, height, pixels).
fn pillow_rgb(st: &SafeTensors, name: &str) -> (usize, usize, Vec<u8>) {
    let t = st.tensor(&format!("{name}_rgb")).unwrap();
    let shape = t.shape();
    assert_eq!(shape.len(), 3);
    assert_eq!(shape[2], 3);
    (shape[1], shape[0], t.data().to_vec())
}

/// Number of pixels (not bytes) that differ between two RGB images of the same size.
fn differing_pixels(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .filter(|(x, y)| x != y)
        .count()
}

#[test]
fn decoded_pixels_equal_pillow_s_for_every_fixture() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    eprintln!(
        "fixtures made with Pillow {} (libjpeg-turbo {})",
        meta["pillow"], meta["libjpeg_turbo"]
    );
    let mut notes = std::collections::BTreeSet::new();
    for (name, path) in jpegs() {
        let img = preprocess::decode_file(&path).unwrap();
        let (w, h, want) = pillow_rgb(&st, &name);
        assert_eq!((img.width, img.height), (w, h), "{name}");
        assert_eq!(img.rgb.len(), want.len(), "{name}");
        assert_eq!(differing_pixels(&img.rgb, &want), 0, "{name}");
        // The same bytes from memory (uploads) decode the same.
        let mem = preprocess::decode_bytes(
            &std::fs::read(&path).unwrap(),
            "upload",
            preprocess::decode_limits(),
        )
        .unwrap();
        assert_eq!(mem.rgb, img.rgb, "{name} from memory");
        notes.insert(format!("{:?}", img.conversion_note(3)));
    }
    // Gray, colour and CMYK files were all exercised, and the user is told of conversions.
    assert_eq!(notes.len(), 3, "{notes:?}");
}

/// The `image` crate's JPEG decoder (zune-jpeg), which igpt used before, gives other pixels
/// on these fixtures: the comparison above can fail.
#[test]
fn the_fixtures_tell_decoders_apart() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut total = 0;
    for (name, path) in jpegs() {
        let Ok(img) = image::open(&path) else {
            eprintln!("{name}: the image crate does not decode it");
            continue;
        };
        let (_, _, want) = pillow_rgb(&st, &name);
        let rgb = img.to_rgb8().into_raw();
        let n = differing_pixels(&rgb, &want);
        eprintln!("{name}: {n} of {} pixels differ", want.len() / 3);
        total += n;
    }
    assert!(
        total > 0,
        "the image crate now decodes these JPEGs as Pillow does"
    );
}

fn ids(st: &SafeTensors, name: &str) -> Vec<i64> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn token_ids_match_the_hugging_face_processor() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempdir("jpeg-encode");
    for fixture in ["small-a", "small-b"] {
        let model = root().join("hf").join(fixture);
        let m = igpt::formats::load_model(s(&model)).unwrap();
        let side = m.model().side;
        let mut want = Vec::new();
        for (name, path) in jpegs() {
            let img = preprocess::decode_file(&path).unwrap();
            let ours: Vec<i64> = preprocess::image_tokens(img.image(), side, &m.palette)
                .unwrap()
                .iter()
                .map(|&x| x as i64)
                .collect();
            let theirs = ids(&st, &format!("{name}_ids_{fixture}"));
            assert_eq!(ours, theirs, "{name} for {fixture}");
            want.extend(theirs);
        }
        // The command: the folder in name order.
        let out = dir.join(format!("{fixture}.npy"));
        let o = igpt(&[
            "encode",
            "--model",
            s(&model),
            s(&root().join("jpeg")),
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("CMYK"), "{}", stderr(&o));
        let arr = igpt::npy::read(&out).unwrap();
        assert_eq!(arr.shape, vec![12, side * side]);
        let got: Vec<i64> = arr
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, want, "igpt encode for {fixture}");
    }
}

/// Every way of cutting a file short is refused by name, as Pillow refuses it ("image file is
/// truncated"), down to a missing EOI marker; bytes after the EOI marker are ignored.
#[test]
fn truncated_jpegs_are_refused_by_name() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let lim = preprocess::decode_limits();
    for file in [
        "chelsea-q75-420-20x13",
        "chelsea-q75-420-progressive-67x45",
        "camera-gray-q30-progressive-75x60",
        "chelsea-q75-420-restarts-67x45",
    ] {
        let good = std::fs::read(root().join(format!("jpeg/{file}.jpg"))).unwrap();
        for cut in 0..good.len() {
            let err = preprocess::decode_bytes(&good[..cut], "cut.jpg", lim)
                .err()
                .unwrap_or_else(|| panic!("{file} cut to {cut} bytes decoded"));
            let err = format!("{err:#}");
            assert!(err.contains("cut.jpg"), "{err}");
            if cut >= 3 {
                assert!(err.contains("truncated"), "{file} cut to {cut}: {err}");
            }
        }
        let mut longer = good.clone();
        longer.extend_from_slice(b"\0\0\xff\xd8 trailing bytes");
        let img = preprocess::decode_bytes(&longer, "longer.jpg", lim).unwrap();
        assert_eq!(
            img.rgb,
            pillow_rgb(&st, file).2,
            "{file} with trailing bytes"
        );
    }
    // From a file, and from the command line: an error naming the file, not a crash.
    let dir = tempdir("jpeg-truncated");
    let good = std::fs::read(root().join("jpeg/chelsea-q75-420-131x97.jpg")).unwrap();
    let cut = dir.join("half.jpg");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let err = format!("{:#}", preprocess::decode_file(&cut).err().unwrap());
    assert!(
        err.contains("half.jpg") && err.contains("truncated"),
        "{err}"
    );
    let o = igpt(&[
        "encode",
        "--model",
        s(&root().join("hf/small-a")),
        s(&cut),
        "--out",
        s(&dir.join("ids.npy")),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("half.jpg"), "{}", stderr(&o));
}

/// Damaged copies of the files (bytes replaced, sometimes cut short; made as the fixture script
/// makes them): each one Pillow refuses is refused by name, and each one it decodes (libjpeg
/// decoding through the damage) is decoded to the same pixels. Pillow decoded them with
/// libjpeg-turbo's SIMD code off: on corrupt coefficients its SIMD and plain C code differ
/// (by design, libjpeg-turbo promises equal output on valid data only), and igpt builds the C.
#[test]
fn damaged_jpegs_are_refused_or_decoded_as_pillow_does() {
    let bytes = expected();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let per_file: usize = meta.metadata().as_ref().unwrap()["damaged_per_file"]
        .parse()
        .unwrap();
    let verdicts = st.tensor("damaged_verdict").unwrap().data().to_vec();
    let crcs: Vec<u32> = st
        .tensor("damaged_crc32")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(verdicts.len(), 12 * per_file);
    // Pillow's own limit is about 179 megapixels; the script skips files over 2^22 pixels.
    let lim = DecodeLimits {
        max_side: 65535,
        max_bytes: 3 << 22,
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut k = 0;
    let (mut same, mut refused, mut too_large) = (0, 0, 0);
    for (name, path) in jpegs() {
        let good = std::fs::read(&path).unwrap();
        for _ in 0..per_file {
            let bad = rng.mutate(&good, 3);
            let ours = preprocess::decode_bytes(&bad, "damaged.jpg", lim);
            match (verdicts[k], ours) {
                (1, Ok(img)) => {
                    assert_eq!(
                        crc32fast::hash(&img.rgb),
                        crcs[k],
                        "{name}, damaged copy {k}"
                    );
                    same += 1;
                }
                (1, Err(e)) if e.downcast_ref::<preprocess::TooLarge>().is_some() => {
                    too_large += 1;
                }
                (0, Err(e)) => {
                    assert!(format!("{e:#}").contains("damaged.jpg"), "{e:#}");
                    refused += 1;
                }
                (2, _) => too_large += 1,
                (v, Ok(_)) => panic!("{name}, damaged copy {k}: Pillow's verdict {v}, decoded"),
                (v, Err(e)) => panic!("{name}, damaged copy {k}: Pillow's verdict {v}, {e:#}"),
            }
            k += 1;
        }
    }
    eprintln!(
        "damaged JPEGs: {same} decoded as Pillow, {refused} refused as by Pillow, \
         {too_large} over the limits"
    );
    assert!(same > 100 && refused > 100, "{same} {refused}");
}

/// Damaged files (bytes replaced anywhere, sometimes cut short) never panic or abort: each
/// decodes to an image of the size its header says, or is refused by name.
#[test]
fn damaged_jpegs_decode_or_are_refused_by_name() {
    let lim = DecodeLimits {
        max_side: 4096,
        max_bytes: 64 << 20,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut refused, mut decoded) = (0, 0);
    for (name, path) in jpegs() {
        let good = std::fs::read(&path).unwrap();
        for _ in 0..300 {
            let bad = rng.mutate(&good, 2);
            match preprocess::decode_bytes(&bad, "damaged.jpg", lim) {
                Ok(img) => {
                    assert_eq!(img.rgb.len(), img.width * img.height * 3, "{name}");
                    decoded += 1;
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(e.contains("damaged.jpg"), "{e}");
                    refused += 1;
                }
            }
        }
    }
    eprintln!("damaged JPEGs: {decoded} decoded (libjpeg decodes through), {refused} refused");
    assert!(refused > 0 && decoded > 0);
    // A corrupt header (an unknown marker where the frame header should be) names the file
    // and says what libjpeg found.
    let dir = tempdir("jpeg-corrupt");
    let mut bad = std::fs::read(root().join("jpeg/chelsea-q75-420-20x13.jpg")).unwrap();
    let sof = bad.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    bad[sof + 1] = 0xCF; // SOF15: lossless arithmetic, which libjpeg refuses
    let p = dir.join("sof.jpg");
    std::fs::write(&p, &bad).unwrap();
    let err = format!("{:#}", preprocess::decode_file(&p).err().unwrap());
    assert!(
        err.contains("sof.jpg") && err.contains("invalid or unsupported JPEG data"),
        "{err}"
    );
}

/// A header's dimensions are checked before anything is allocated, and a large progressive
/// file's whole-image buffers count towards the memory limit.
#[test]
fn oversized_jpegs_are_refused_before_decoding() {
    let good = std::fs::read(root().join("jpeg/chelsea-q75-420-20x13.jpg")).unwrap();
    let sof = good.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    // SOF0: length (2), precision (1), height (2), width (2).
    let mut bomb = good.clone();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]); // 60000 x 60000
    let dir = tempdir("jpeg-bomb");
    let p = dir.join("bomb.jpg");
    std::fs::write(&p, &bomb).unwrap();
    let err = format!("{:#}", preprocess::decode_file(&p).err().unwrap());
    assert!(err.contains("bomb.jpg") && err.contains("limits"), "{err}");
    let e = preprocess::decode_bytes(&bomb, "upload", preprocess::decode_limits())
        .err()
        .unwrap();
    assert!(e.downcast_ref::<preprocess::TooLarge>().is_some(), "{e:#}");

    // The same files said to be 4000 x 4000: the decoded RGB (48 MB) fits in 50 MB, but a
    // progressive file also needs its coefficients (2 bytes each, 48 MB more at 4:2:0) for
    // the whole image, and is refused before they are allocated. With room for them both
    // files decode (libjpeg fills in past the end of their scans, as for Pillow).
    let resized = |file: &str, marker: u8| {
        let mut b = std::fs::read(root().join(format!("jpeg/{file}.jpg"))).unwrap();
        let sof = b.windows(2).position(|w| w == [0xFF, marker]).unwrap();
        b[sof + 5..sof + 9].copy_from_slice(&[0x0F, 0xA0, 0x0F, 0xA0]);
        b
    };
    let base = resized("chelsea-q30-422-67x45", 0xC0);
    let prog = resized("chelsea-q75-420-progressive-67x45", 0xC2);
    let limits = |mb: u64| DecodeLimits {
        max_side: 4000,
        max_bytes: mb << 20,
    };
    let too_large =
        |bytes: &[u8], mb: u64| match preprocess::decode_bytes(bytes, "upload", limits(mb)) {
            Ok(img) => {
                assert_eq!((img.width, img.height), (4000, 4000));
                false
            }
            Err(e) => e.downcast_ref::<preprocess::TooLarge>().is_some(),
        };
    assert!(!too_large(&base, 50));
    assert!(too_large(&prog, 50));
    assert!(!too_large(&prog, 120));
    assert!(too_large(&base, 40));
    let base = std::fs::read(root().join("jpeg/chelsea-q30-422-67x45.jpg")).unwrap();
    // A side over the limit.
    let narrow = DecodeLimits {
        max_side: 66,
        max_bytes: 1 << 20,
    };
    let e = preprocess::decode_bytes(&base, "wide", narrow)
        .err()
        .unwrap();
    assert!(e.downcast_ref::<preprocess::TooLarge>().is_some(), "{e:#}");
}
