//! Palettes, data readers and the token cache, on data made in the test.

mod common;
use common::{idx_bytes, s, tempdir};

use igpt::data::{self, Format, ImageSet, TokenSet};
use igpt::npy::{self, DType};
use igpt::palette::{FitOptions, Palette};
use std::io::Write;

#[test]
fn kmeans_finds_well_separated_colours() {
    // Three tight RGB clusters.
    let centres = [[10u8, 20, 200], [240, 240, 10], [120, 0, 60]];
    let mut px = Vec::new();
    for i in 0..3000 {
        let c = centres[i % 3];
        let j = (i / 3 % 5) as u8;
        px.extend_from_slice(&[c[0] + j, c[1] + j, c[2] + j]);
    }
    let p = Palette::fit(
        &px,
        3,
        &FitOptions {
            k: 3,
            iterations: 20,
            sample: 0,
            seed: 7,
        },
    )
    .unwrap();
    for c in centres {
        let tok = p.encode_pixel(&c);
        let back = p.decode(&[tok]).unwrap();
        for k in 0..3 {
            assert!(
                (back[k] as i32 - c[k] as i32).abs() <= 3,
                "centre {c:?} decoded as {back:?}"
            );
        }
    }
    // Deterministic for a seed.
    assert_eq!(
        p,
        Palette::fit(
            &px,
            3,
            &FitOptions {
                k: 3,
                iterations: 20,
                sample: 0,
                seed: 7
            }
        )
        .unwrap()
    );
}

#[test]
fn kmeans_uses_every_centre_when_colours_are_few() {
    // As many clusters as distinct colours: empty clusters must be re-seeded, so every colour
    // ends up with its own centre and quantisation is lossless.
    let px: Vec<u8> = (0..2000)
        .map(|i| [0u8, 50, 51, 52, 200, 255][i % 6])
        .collect();
    let p = Palette::fit(
        &px,
        1,
        &FitOptions {
            k: 6,
            iterations: 50,
            sample: 0,
            seed: 1,
        },
    )
    .unwrap();
    let tokens = p.encode(&px);
    assert_eq!(p.decode(&tokens).unwrap(), px);
    let err = Palette::fit(
        &px,
        1,
        &FitOptions {
            k: 7,
            iterations: 5,
            sample: 0,
            seed: 1,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("distinct colours"), "{err}");
}

#[test]
fn encode_and_decode_follow_the_reference_rules() {
    let p = Palette::new(
        3,
        vec![
            -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.2, -0.5, 0.9,
        ],
    )
    .unwrap();
    // 127.5 * (0 + 1) = 127.5 rounds half to even: 128; 127.5 * 1.2 = 153.0.
    assert_eq!(p.decode(&[1]).unwrap(), vec![128, 128, 128]);
    assert_eq!(p.decode(&[3]).unwrap(), vec![153, 64, 242]);
    assert_eq!(
        p.encode(&[0, 0, 0, 255, 255, 255, 130, 126, 128]),
        vec![0, 2, 1]
    );
    assert!(
        p.decode(&[4]).is_err(),
        "ids outside the palette are refused"
    );
}

#[test]
fn palette_files_round_trip_in_both_formats() {
    let dir = tempdir("palette");
    let p = Palette::new(3, (0..30).map(|i| (i as f32 / 15.0) - 1.0).collect()).unwrap();
    for name in ["p.json", "p.npy"] {
        p.save(&dir.join(name)).unwrap();
        assert_eq!(Palette::load(&dir.join(name)).unwrap(), p);
    }
    // OpenAI ships float64 centres.
    let f64s: Vec<u8> = p
        .centers
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    std::fs::write(
        dir.join("kmeans_centers.npy"),
        npy::encode(&[10, 3], DType::F64, &f64s),
    )
    .unwrap();
    assert_eq!(Palette::load(&dir.join("kmeans_centers.npy")).unwrap(), p);
    // Wrong dtype and wrong shape are refused.
    std::fs::write(
        dir.join("bad.npy"),
        npy::encode(&[10, 3], DType::U8, &[0u8; 30]),
    )
    .unwrap();
    assert!(
        Palette::load(&dir.join("bad.npy"))
            .unwrap_err()
            .to_string()
            .contains("float")
    );
    std::fs::write(dir.join("bad2.npy"), npy::encode_f32(&[5, 2], &[0.0; 10])).unwrap();
    assert!(Palette::load(&dir.join("bad2.npy")).is_err());
    let gray = Palette::uniform_gray(4).unwrap();
    assert_eq!(gray.decode(&[0, 1, 2, 3]).unwrap(), vec![0, 85, 170, 255]);
}

#[test]
fn idx_reads_raw_and_gzip_with_labels() {
    let dir = tempdir("idx");
    let body: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    std::fs::write(
        dir.join("x-images-idx3-ubyte"),
        idx_bytes(&[3, 4, 5], &body, 8),
    )
    .unwrap();
    std::fs::write(
        dir.join("x-labels-idx1-ubyte"),
        idx_bytes(&[3], &[2, 0, 1], 8),
    )
    .unwrap();
    let set = data::load(
        dir.join("x-images-idx3-ubyte").to_str().unwrap(),
        Format::Auto,
    )
    .unwrap();
    assert_eq!(
        (set.len(), set.height, set.width, set.channels),
        (3, 4, 5, 1)
    );
    assert_eq!(set.pixels, body);
    assert_eq!(set.labels, Some(vec![2, 0, 1]));
    let gz = dir.join("y-images-idx3-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&idx_bytes(&[3, 4, 5], &body, 8)).unwrap();
    enc.finish().unwrap();
    let set = data::load(gz.to_str().unwrap(), Format::Auto).unwrap();
    assert_eq!(set.pixels, body);
    assert_eq!(set.labels, None);
}

#[test]
fn the_shipped_fashion_mnist_split_loads() {
    let set = data::load(data::BUILTIN_FASHION, Format::Auto).unwrap();
    assert_eq!(
        (set.len(), set.height, set.width, set.channels),
        (10_000, 28, 28, 1)
    );
    assert_eq!(set.class_names.len(), 10);
    let labels = set.labels.unwrap();
    for c in 0..10 {
        assert_eq!(
            labels.iter().filter(|&&l| l == c).count(),
            1000,
            "class {c}"
        );
    }
}

#[test]
fn cifar_10_and_100_records() {
    let dir = tempdir("cifar");
    let mut c10 = Vec::new();
    let mut c100 = Vec::new();
    for i in 0..4u8 {
        c10.push(i);
        c100.extend_from_slice(&[9, 10 + i]);
        for plane in 0..3u8 {
            let img: Vec<u8> = (0..1024)
                .map(|p| (p as u8).wrapping_add(plane * 50 + i))
                .collect();
            c10.extend_from_slice(&img);
            c100.extend_from_slice(&img);
        }
    }
    std::fs::write(dir.join("data_batch_1.bin"), &c10).unwrap();
    std::fs::write(dir.join("train.bin"), &c100).unwrap();
    let a = data::load(dir.join("data_batch_1.bin").to_str().unwrap(), Format::Auto).unwrap();
    assert_eq!((a.len(), a.height, a.channels), (4, 32, 3));
    assert_eq!(a.labels, Some(vec![0, 1, 2, 3]));
    // Planar to interleaved: pixel 5 of image 1 is (5+1, 5+51, 5+101).
    assert_eq!(&a.image(1)[15..18], &[6, 56, 106]);
    let b = data::load(dir.join("train.bin").to_str().unwrap(), Format::Auto).unwrap();
    assert_eq!(
        b.labels,
        Some(vec![10, 11, 12, 13]),
        "CIFAR-100 keeps the fine label"
    );
    assert_eq!(a.pixels, b.pixels);
    std::fs::write(dir.join("cut.bin"), &c10[..c10.len() - 5]).unwrap();
    let err = data::load(dir.join("cut.bin").to_str().unwrap(), Format::Cifar10).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
}

#[test]
fn image_folders_with_classes_and_resizing() {
    let dir = tempdir("folder");
    for (c, colour) in [("cat", [200u8, 10, 10]), ("dog", [10, 10, 200])] {
        std::fs::create_dir_all(dir.join(c)).unwrap();
        for k in 0..2 {
            let img = image::RgbImage::from_pixel(20 + k * 4, 16, image::Rgb(colour));
            img.save(dir.join(c).join(format!("{k}.png"))).unwrap();
        }
    }
    let set = data::load_shaped(s(&dir), Format::Auto, None, Some(8), Some(3)).unwrap();
    assert_eq!(
        (set.len(), set.height, set.width, set.channels),
        (4, 8, 8, 3)
    );
    assert_eq!(set.labels, Some(vec![0, 0, 1, 1]));
    assert_eq!(set.class_names, vec!["cat", "dog"]);
    assert_eq!(&set.image(3)[..3], &[10, 10, 200]);
    // A broken file is named in the error.
    std::fs::write(dir.join("dog").join("broken.png"), b"not a png").unwrap();
    let err = format!(
        "{:#}",
        data::load_shaped(s(&dir), Format::Auto, None, Some(8), Some(3)).unwrap_err()
    );
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn npy_images_with_labels() {
    let dir = tempdir("npy");
    let px: Vec<u8> = (0..2 * 3 * 3 * 3).map(|i| i as u8).collect();
    std::fs::write(
        dir.join("imgs.npy"),
        npy::encode(&[2, 3, 3, 3], DType::U8, &px),
    )
    .unwrap();
    let labels: Vec<u8> = [4i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(
        dir.join("imgs_labels.npy"),
        npy::encode(&[2], DType::I64, &labels),
    )
    .unwrap();
    let set = data::load(dir.join("imgs.npy").to_str().unwrap(), Format::Auto).unwrap();
    assert_eq!((set.len(), set.height, set.channels), (2, 3, 3));
    assert_eq!(set.labels, Some(vec![4, 1]));
    // Float images are refused with advice.
    std::fs::write(dir.join("f.npy"), npy::encode_f32(&[1, 2, 2], &[0.0; 4])).unwrap();
    let err = format!(
        "{:#}",
        data::load(dir.join("f.npy").to_str().unwrap(), Format::Auto).unwrap_err()
    );
    assert!(err.contains("uint8"), "{err}");
}

#[test]
fn token_cache_round_trips_through_a_memory_map() {
    let dir = tempdir("cache");
    let set = ImageSet {
        height: 4,
        width: 4,
        channels: 1,
        pixels: (0..5 * 16).map(|i| (i * 3 % 256) as u8).collect(),
        labels: Some(vec![0, 1, 2, 3, 4]),
        class_names: vec![],
    };
    let p = Palette::uniform_gray(8).unwrap();
    let mem = TokenSet::quantise(&set, &p, "test").unwrap();
    mem.save(&dir.join("a.tokens")).unwrap();
    let mapped = TokenSet::open(&dir.join("a.tokens")).unwrap();
    assert_eq!(mapped.header, mem.header);
    let (mut x, mut y) = (vec![0u16; 16], vec![0u16; 16]);
    for i in 0..5 {
        mem.copy_image(i, &mut x);
        mapped.copy_image(i, &mut y);
        assert_eq!(x, y);
        assert_eq!(mapped.label(i), Some(i as u32));
    }
    // Truncated and foreign files are refused.
    let bytes = std::fs::read(dir.join("a.tokens")).unwrap();
    std::fs::write(dir.join("cut.tokens"), &bytes[..bytes.len() - 3]).unwrap();
    assert!(
        TokenSet::open(&dir.join("cut.tokens"))
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    std::fs::write(dir.join("x.tokens"), b"hello world, this is not it").unwrap();
    assert!(
        TokenSet::open(&dir.join("x.tokens"))
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
}

#[test]
fn validation_split_is_disjoint_and_deterministic() {
    let set = ImageSet {
        height: 1,
        width: 1,
        channels: 1,
        pixels: (0..100).collect(),
        labels: None,
        class_names: vec![],
    };
    let (a, b) = set.split(0.1, 3);
    assert_eq!((a.len(), b.len()), (90, 10));
    let mut all: Vec<u8> = a.pixels.iter().chain(&b.pixels).copied().collect();
    all.sort();
    assert_eq!(all, (0..100).collect::<Vec<u8>>());
    assert_eq!(set.split(0.1, 3).1.pixels, b.pixels);
}
