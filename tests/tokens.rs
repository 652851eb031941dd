//! One image-to-tokens path: the palette's quantiser against Hugging Face's arithmetic (ties
//! included), and every command seeing the same tokens for the same image files.

mod common;

use common::{Rng, igpt, s, stderr, tempdir};
use igpt::data::{self, Format, TokenSet};
use igpt::palette::Palette;
use std::path::{Path, PathBuf};

/// `ImageGPTImageProcessor`'s nearest cluster, written out as numpy computes it: pixels
/// `float32(x * (1/255))` then `(x - 0.5) / 0.5` in float32; `|a|^2` summed in float32,
/// `a.b` and `|b|^2` in float64, `d = |a|^2 - 2 a.b + |b|^2`, `np.argmin` (first index on ties).
/// A grayscale palette is compared as Hugging Face sees it after `igpt convert --to hf`: gray
/// triples against the pixel copied to R, G and B.
fn hf_nearest(clusters: &[[f64; 3]], rgb: [u8; 3]) -> u16 {
    let a = rgb.map(|v| {
        let x = (v as f64 * (1.0 / 255.0)) as f32;
        (x - 0.5f32) / 0.5f32
    });
    let a2 = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]) as f64;
    let mut best = (f64::INFINITY, 0);
    for (i, c) in clusters.iter().enumerate() {
        let ab = a[0] as f64 * c[0] + a[1] as f64 * c[1] + a[2] as f64 * c[2];
        let b2 = c[0] * c[0] + c[1] * c[1] + c[2] * c[2];
        let d = a2 - 2.0 * ab + b2;
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1 as u16
}

fn clusters_of(p: &Palette) -> Vec<[f64; 3]> {
    p.exact_centers()
        .chunks_exact(p.channels)
        .map(|c| {
            if c.len() == 1 {
                [c[0]; 3]
            } else {
                [c[0], c[1], c[2]]
            }
        })
        .collect()
}

/// Gray palettes whose centres sit exactly halfway between pairs of pixel levels' values,
/// duplicated centres, and random ones: every level must get Hugging Face's id.
#[test]
fn gray_quantiser_agrees_with_hugging_face_on_every_level_and_tie() {
    let level = |v: u8| ((v as f64 * (1.0 / 255.0)) as f32 - 0.5) / 0.5;
    let mut palettes = vec![
        Palette::uniform_gray(16).unwrap(),
        // Duplicates: the first of equal centres wins.
        Palette::new(1, vec![0.5, -0.25, 0.5, -0.25, 1.0]).unwrap(),
    ];
    // Centres at exact midpoints around each level: distances tie in exact arithmetic, and
    // only the processor's own rounding decides.
    for v in [1u8, 37, 64, 100, 128, 200, 254] {
        let x = level(v);
        for delta in [1.0 / 255.0, 2.0 / 255.0, 0.125, 0.5] {
            palettes.push(Palette::new(1, vec![x - delta as f32, x + delta as f32]).unwrap());
            palettes.push(Palette::new(1, vec![x + delta as f32, x - delta as f32]).unwrap());
        }
        palettes.push(Palette::new(1, vec![level(v - 1), level(v + 1)]).unwrap());
    }
    let mut rng = Rng(7);
    for k in [3, 8, 16, 64, 255] {
        for _ in 0..20 {
            palettes.push(Palette::new(1, (0..k).map(|_| rng.unit()).collect()).unwrap());
        }
    }
    let levels: Vec<u8> = (0..=255).collect();
    for p in &palettes {
        let clusters = clusters_of(p);
        let ours = p.encode(&levels);
        for (&v, &id) in levels.iter().zip(&ours) {
            assert_eq!(
                id,
                hf_nearest(&clusters, [v; 3]),
                "level {v}, palette {p:?}"
            );
            assert_eq!(p.encode_pixel(&[v]), id, "level {v}, palette {p:?}");
        }
    }
}

#[test]
fn rgb_quantiser_agrees_with_hugging_face_on_ties_and_a_sample_of_colours() {
    let mut rng = Rng(11);
    let mut colours: Vec<u8> = Vec::new();
    // A grid through the whole cube, then random colours.
    for r in (0..=255u32).step_by(15) {
        for g in (0..=255u32).step_by(15) {
            for b in (0..=255u32).step_by(15) {
                colours.extend([r as u8, g as u8, b as u8]);
            }
        }
    }
    for _ in 0..20_000 {
        colours.extend([0, 0, 0].map(|_: u8| rng.next() as u8));
    }
    let mut palettes = vec![
        // Duplicates and mirror images around mid-gray: exact ties.
        Palette::new(
            3,
            vec![
                0.2, -0.4, 0.6, 0.2, -0.4, 0.6, -0.2, 0.4, -0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            ],
        )
        .unwrap(),
    ];
    for k in [2, 16, 100, 512] {
        palettes.push(Palette::new(3, (0..3 * k).map(|_| rng.unit()).collect()).unwrap());
    }
    // Centres on the pixel lattice, so many colours sit exactly between two of them.
    let lattice: Vec<f32> = (0..3 * 64)
        .map(|_| ((rng.next() % 256) as f64 * (1.0 / 127.5) - 1.0) as f32)
        .collect();
    palettes.push(Palette::new(3, lattice).unwrap());
    // Centres far outside [-1, 1] (a hand-written palette file may hold any finite values): the
    // nearest is still one of them, never the quantiser's padding.
    // Fifteen of them: the screen's block of sixteen then holds one padding lane.
    let far: Vec<f32> = (0..3 * 15)
        .map(|i| (2e6 + 1e5 * i as f64) as f32 * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    palettes.push(Palette::new(3, far).unwrap());
    for p in &palettes {
        let clusters = clusters_of(p);
        let ours = p.encode(&colours);
        let wrong = colours
            .chunks_exact(3)
            .zip(&ours)
            .filter(|(c, id)| **id != hf_nearest(&clusters, [c[0], c[1], c[2]]))
            .count();
        assert_eq!(
            wrong,
            0,
            "{} of {} colours, palette of {}",
            wrong,
            ours.len(),
            p.len()
        );
    }
}

/// Five small images of other sizes than the models' side (6), in several modes: RGB, RGBA,
/// grayscale, and a non-square one, so channel conversion and the resize are exercised.
fn image_folder(dir: &Path) -> Vec<PathBuf> {
    let folder = dir.join("imgs");
    std::fs::create_dir_all(&folder).unwrap();
    let mut files = Vec::new();
    let mut save = |name: &str, img: image::DynamicImage| {
        let p = folder.join(name);
        img.save(&p).unwrap();
        files.push(p);
    };
    save(
        "a.png",
        image::RgbImage::from_fn(10, 10, |x, y| {
            image::Rgb([(x * 25) as u8, (y * 25) as u8, ((x + y) * 12) as u8])
        })
        .into(),
    );
    save(
        "b.png",
        image::RgbImage::from_fn(13, 9, |x, y| {
            image::Rgb([255 - (x * 19) as u8, (x * y * 3) as u8, (y * 28) as u8])
        })
        .into(),
    );
    save(
        "c.png",
        image::GrayImage::from_fn(7, 7, |x, y| image::Luma([(x * 36 + y * 5) as u8])).into(),
    );
    save(
        "d.png",
        image::RgbaImage::from_fn(12, 12, |x, y| {
            image::Rgba([(y * 21) as u8, 200 - (x * 15) as u8, (x * 9) as u8, 128])
        })
        .into(),
    );
    save(
        "e.png",
        image::RgbImage::from_fn(8, 20, |x, y| {
            image::Rgb([(x * 31) as u8, (y * 12) as u8, 255 - (y * 12) as u8])
        })
        .into(),
    );
    files
}

/// A folder read as a data set gives the pixels its files give one by one, for both channel
/// counts (mixed sizes: each image resized once, from its own size).
#[test]
fn a_folder_and_its_files_give_the_same_pixels() {
    let dir = tempdir("tokens-lib");
    let files = image_folder(&dir);
    for channels in [1, 3] {
        let set = data::load_shaped(
            s(&dir.join("imgs")),
            Format::Auto,
            None,
            Some(6),
            Some(channels),
        )
        .unwrap();
        let one_by_one = data::read_files(&files, 6, channels, |_, _| {}).unwrap();
        assert_eq!(set.len(), 5);
        assert_eq!(set.pixels, one_by_one.pixels, "{channels} channel(s)");
        // And each is the Pillow-exact resize of the converted file.
        let img = igpt::preprocess::decode_file(&files[1]).unwrap();
        let converted = igpt::preprocess::convert_channels(&img.rgb, 3, channels).unwrap();
        let pillow = igpt::preprocess::resize_bilinear(&converted, 13, 9, channels, 6, 6);
        assert_eq!(set.image(1), &pillow[..]);
        // A range of the folder is the same images.
        let part = data::load_shaped(
            s(&dir.join("imgs")),
            Format::Auto,
            Some(2..4),
            Some(6),
            Some(channels),
        )
        .unwrap();
        assert_eq!(
            part.pixels,
            set.pixels[2 * 36 * channels..4 * 36 * channels]
        );
    }
}

fn read_ids(path: &Path) -> Vec<i64> {
    let arr = igpt::npy::read(path).unwrap();
    arr.to_i64().unwrap()
}

fn scores(csv: &Path) -> Vec<String> {
    std::fs::read_to_string(csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            format!("{} {}", cols[0], cols[cols.len() - 2])
        })
        .collect()
}

fn cached_tokens(path: &Path) -> Vec<i64> {
    let set = TokenSet::open(path).unwrap();
    let t = set.header.t;
    let mut out = vec![0u16; set.len() * t];
    for (i, img) in out.chunks_mut(t).enumerate() {
        set.copy_image(i, img);
    }
    out.into_iter().map(|x| x as i64).collect()
}

/// A model trained on a folder sees the tokens `encode` and `complete` give for its files, and
/// `score` gives the same tokens and scores whether it reads the folder as `--data` or the files
/// as `--images`; for an RGB and a grayscale model.
#[test]
fn train_score_encode_and_complete_see_the_same_tokens() {
    let dir = tempdir("tokens-cli");
    let files = image_folder(&dir);
    let folder = dir.join("imgs");
    for channels in ["3", "1"] {
        let run = dir.join(format!("run{channels}"));
        let o = igpt(&[
            "train",
            "--data",
            s(&folder),
            "--val-data",
            s(&folder),
            "--side",
            "6",
            "--channels",
            channels,
            "--out",
            s(&run),
            "--steps",
            "2",
            "--layers",
            "1",
            "--embd",
            "16",
            "--heads",
            "2",
            "--palette-size",
            "8",
            "--batch",
            "2",
            "--warmup",
            "1",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        // With --val-data the training cache holds the whole folder, in order.
        let cache = cached_tokens(&run.join("data/train.tokens"));
        assert_eq!(cache.len(), 5 * 36);
        assert_eq!(cache, cached_tokens(&run.join("data/val.tokens")));

        let ids = dir.join(format!("ids{channels}.npy"));
        let o = igpt(&["encode", "--model", s(&run), s(&folder), "--out", s(&ids)]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            read_ids(&ids),
            cache,
            "{channels} channel(s): encode vs training"
        );

        let (csv_a, tok_a) = (dir.join("a.csv"), dir.join("a.npy"));
        let o = igpt(&[
            "score",
            "--model",
            s(&run),
            "--data",
            s(&folder),
            "--csv",
            s(&csv_a),
            "--tokens",
            s(&tok_a),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let (csv_b, tok_b) = (dir.join("b.csv"), dir.join("b.npy"));
        let mut args = vec![
            "score",
            "--model",
            s(&run),
            "--csv",
            s(&csv_b),
            "--tokens",
            s(&tok_b),
            "--images",
        ];
        args.extend(files.iter().map(|f| s(f)));
        let o = igpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("resized to 6x6"), "{}", stderr(&o));
        assert_eq!(igpt::npy::read(&tok_a).unwrap().shape, vec![5, 6, 6]);
        assert_eq!(
            read_ids(&tok_a),
            cache,
            "{channels} channel(s): score --data"
        );
        assert_eq!(
            read_ids(&tok_b),
            cache,
            "{channels} channel(s): score --images"
        );
        let (a, b) = (scores(&csv_a), scores(&csv_b));
        assert_eq!(a.len(), 5);
        assert_eq!(a, b, "{channels} channel(s): per-image scores");

        // Completing from every row keeps each whole image: the completions are the originals
        // `complete` read from the files.
        let done = dir.join(format!("done{channels}.npy"));
        let mut args = vec![
            "complete",
            "--model",
            s(&run),
            "--rows",
            "6",
            "--k",
            "1",
            "--out",
        ];
        let grid = dir.join("grid.png");
        args.push(s(&grid));
        args.extend(["--tokens", s(&done), "--images"]);
        args.extend(files.iter().map(|f| s(f)));
        let o = igpt(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(read_ids(&done), cache, "{channels} channel(s): complete");
    }
}

#[test]
fn colour_to_gray_is_pillows_convert_l() {
    // Fixture by scripts/make_luma_fixture.py: 4,096 colours and Pillow's own `convert("L")`.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/luma");
    let want = image::open(dir.join("l.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    // The path every command takes: the file decoded, then shaped for a gray model.
    let img = igpt::preprocess::decode_file(&dir.join("rgb.png")).unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    let gray = igpt::preprocess::shape(img.image(), 64, 1).unwrap();
    assert_eq!(gray.len(), want.len());
    let wrong = gray.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} pixels differ from Pillow",
        want.len()
    );
    // A gray image comes back unchanged through RGB and back.
    let rgb = igpt::preprocess::convert_channels(&want, 1, 3).unwrap();
    assert_eq!(
        igpt::preprocess::convert_channels(&rgb, 3, 1).unwrap(),
        want
    );
}
