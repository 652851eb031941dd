//! JPEG files decoded as Pillow decodes them: `Image.open(f).convert("RGB")`.
//!
//! Pillow decodes JPEG with libjpeg-turbo, default settings (ISLOW integer IDCT, fancy
//! upsampling). This is the same decoder, from the mozjpeg fork (whose decoder is
//! libjpeg-turbo's), compiled from source by the `mozjpeg-sys` crate with only a C compiler.
//! What Pillow does around it is reproduced too:
//! - the mode comes from the number of components: 1 is "L" (gray, copied to R, G and B by
//!   `convert("RGB")`), 3 is "RGB", 4 is "CMYK" (libjpeg's CMYK output read inverted, Adobe's
//!   convention, then Pillow's `cmyk2rgb`); anything else is refused;
//! - the data are fed to a suspending source, as Pillow's decoder is: a file that ends before
//!   the last row is decoded is truncated (Pillow: "image file is truncated"). libjpeg reads
//!   on to the next marker to finish the last row, so in the fixtures even a file missing only
//!   its EOI marker is refused, as Pillow refuses it (`tests/jpeg.rs`); data past the last row
//!   are not required by this code itself;
//! - libjpeg's warnings (corrupt data it decodes through) are ignored and its fatal errors
//!   refuse the file. libjpeg's default error handler exits the process; here it unwinds back
//!   to [`decode`], which turns it into an [`Error`]. That needs the default `panic = "unwind"`:
//!   built with `panic = "abort"` (mozjpeg-sys then warns at build time), a corrupt JPEG would
//!   abort the process.

use mozjpeg_sys as ffi;
use std::os::raw::{c_int, c_long};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// `jpeg_read_header`'s answers.
const JPEG_SUSPENDED: c_int = 0;
const JPEG_HEADER_TABLES_ONLY: c_int = 2;

/// Why a JPEG was not decoded.
#[derive(Debug)]
pub enum Error {
    /// The data end before the last row of pixels.
    Truncated,
    /// Wider or taller than allowed, or more memory than allowed (decoded pixels plus the
    /// decoder's own whole-image buffers, which progressive files need).
    TooLarge,
    /// A JPEG that Pillow would not open either (its number of components).
    Unsupported(String),
    /// libjpeg's fatal error.
    Corrupt(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Truncated => write!(f, "the JPEG data end too early (a truncated file)"),
            Error::TooLarge => write!(f, "the JPEG is larger than the decoder's limits"),
            Error::Unsupported(s) => write!(f, "{s}"),
            Error::Corrupt(s) => write!(f, "invalid or unsupported JPEG data: {s}"),
        }
    }
}

impl std::error::Error for Error {}

/// The colour model of a decoded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gray,
    Rgb,
    /// CMYK or YCCK, converted to RGB as Pillow does.
    Cmyk,
}

/// A decoded JPEG: 8-bit RGB, `height x width x 3`.
pub struct Jpeg {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub kind: Kind,
}

/// Whether `bytes` start as a JPEG file does (Pillow's test: `FF D8 FF`).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// libjpeg's fatal error, carried out of its error handler by unwinding.
struct Fatal {
    code: c_int,
    message: String,
}

/// libjpeg's `error_exit`: never returns to libjpeg. It unwinds (without the panic hook, so
/// nothing is printed) to the `catch_unwind` in [`decode`], which is the only caller of libjpeg
/// here. mozjpeg-sys builds libjpeg with `-fexceptions` (its `unwinding` feature) and declares
/// every function and callback `C-unwind`, so unwinding through its frames is defined; libjpeg
/// allows a decoder abandoned this way (its documented `longjmp` recovery) to be destroyed.
extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let mut buf = [0u8; 80];
    // SAFETY: `err` is the error manager set up in `decode`, alive while libjpeg runs;
    // `format_message` writes at most JMSG_LENGTH_MAX (80) bytes, NUL included, into `buf`.
    let code = unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            // The binding declares the buffer `&[u8; 80]`; libjpeg writes through it, so it is
            // passed as the pointer it is (the same ABI).
            let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
                std::mem::transmute(format);
            format(cinfo, buf.as_mut_ptr());
        }
        (*cinfo.err).msg_code
    };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let message = String::from_utf8_lossy(&buf[..len]).into_owned();
    resume_unwind(Box::new(Fatal { code, message }));
}

/// Pillow's `output_message`: warnings are not shown.
extern "C-unwind" fn output_message(_: &mut ffi::jpeg_common_struct) {}

/// The source manager's callbacks: all data are in the buffer from the start, as if Pillow
/// had fed the whole file, so asking for more is suspending for good (truncation).
extern "C-unwind" fn init_source(_: &mut ffi::jpeg_decompress_struct) {}

extern "C-unwind" fn fill_input_buffer(_: &mut ffi::jpeg_decompress_struct) -> ffi::boolean {
    0
}

extern "C-unwind" fn skip_input_data(cinfo: &mut ffi::jpeg_decompress_struct, n: c_long) {
    // SAFETY: `src` is the source manager set up in `decode`, over the caller's bytes;
    // advancing by at most `bytes_in_buffer` stays within them.
    unsafe {
        let src = &mut *cinfo.src;
        let n = usize::try_from(n).unwrap_or(0).min(src.bytes_in_buffer);
        src.next_input_byte = src.next_input_byte.add(n);
        src.bytes_in_buffer -= n;
    }
}

extern "C-unwind" fn term_source(_: &mut ffi::jpeg_decompress_struct) {}

/// libjpeg's state, boxed so that the pointers between its parts stay valid.
struct Decoder {
    cinfo: ffi::jpeg_decompress_struct,
    err: ffi::jpeg_error_mgr,
    src: ffi::jpeg_source_mgr,
}

/// Decodes a JPEG file held in `bytes` to RGB, refusing it (before allocating its pixels)
/// when a side is over `max_side` or the decoded pixels and libjpeg's whole-image buffers
/// would take more than `max_bytes`.
pub fn decode(bytes: &[u8], max_side: u32, max_bytes: u64) -> Result<Jpeg, Error> {
    // SAFETY: all-zero bytes are a valid value of these C structs (null pointers, `None`
    // callbacks, zero integers, and each enum's first variant); libjpeg fills them in.
    let mut d: Box<Decoder> = unsafe { Box::new(std::mem::zeroed()) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `d` is boxed and outlives every libjpeg call (it is destroyed below, after
        // them); `cinfo.err` and `cinfo.src` point into it; the source points into `bytes`,
        // alive for this call. libjpeg's errors unwind out of this closure (see `error_exit`).
        unsafe { run(&mut d, bytes, max_side, max_bytes) }
    }));
    // SAFETY: destroying is allowed in any state once created, also after a fatal error
    // (libjpeg's documented recovery); if creation itself failed, `mem` is null and
    // `jpeg_destroy` does nothing. Nothing of libjpeg's is used afterwards.
    unsafe {
        if !d.cinfo.common.err.is_null() {
            ffi::jpeg_destroy_decompress(&mut d.cinfo);
        }
    }
    match result {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<Fatal>() {
            Ok(f) if f.code == ffi::JERR_NO_BACKING_STORE as c_int => Err(Error::TooLarge),
            Ok(f) => Err(Error::Corrupt(f.message)),
            // A panic of ours (a bug), not libjpeg's: let it go on.
            Err(other) => resume_unwind(other),
        },
    }
}

/// The decoding proper; see [`decode`] for why the unsafe operations hold.
unsafe fn run(d: &mut Decoder, bytes: &[u8], max_side: u32, max_bytes: u64) -> Result<Jpeg, Error> {
    unsafe {
        ffi::jpeg_std_error(&mut d.err);
        d.err.error_exit = Some(error_exit);
        d.err.output_message = Some(output_message);
        d.cinfo.common.err = &mut d.err;
        ffi::jpeg_create_decompress(&mut d.cinfo);
        d.src = ffi::jpeg_source_mgr {
            next_input_byte: bytes.as_ptr(),
            bytes_in_buffer: bytes.len(),
            init_source: Some(init_source),
            fill_input_buffer: Some(fill_input_buffer),
            skip_input_data: Some(skip_input_data),
            resync_to_restart: Some(ffi::jpeg_resync_to_restart),
            term_source: Some(term_source),
        };
        d.cinfo.src = &mut d.src;
        let c = &mut d.cinfo;
        // As Pillow: a tables-only datastream may come before the image.
        let mut header = ffi::jpeg_read_header(c, 0);
        while header == JPEG_HEADER_TABLES_ONLY {
            header = ffi::jpeg_read_header(c, 0);
        }
        if header == JPEG_SUSPENDED {
            return Err(Error::Truncated);
        }
        let (w, h) = (c.image_width, c.image_height);
        let kind = match c.num_components {
            1 => Kind::Gray,
            3 => Kind::Rgb,
            4 => Kind::Cmyk,
            n => {
                return Err(Error::Unsupported(format!(
                    "a JPEG of {n} components is not supported (only 1, 3 or 4, as Pillow)"
                )));
            }
        };
        let out = w as u64 * h as u64 * 3;
        if w > max_side || h > max_side || out > max_bytes {
            return Err(Error::TooLarge);
        }
        // What libjpeg may take for its whole-image buffers (progressive files); past it,
        // it asks for a backing store, which is refused (`JERR_NO_BACKING_STORE`).
        (*c.common.mem).max_memory_to_use =
            (max_bytes - out).clamp(1, c_long::MAX as u64) as c_long;
        let components = match kind {
            Kind::Gray => {
                c.out_color_space = ffi::JCS_GRAYSCALE;
                1
            }
            Kind::Rgb => {
                c.out_color_space = ffi::JCS_RGB;
                3
            }
            Kind::Cmyk => {
                c.out_color_space = ffi::JCS_CMYK;
                4
            }
        };
        if ffi::jpeg_start_decompress(c) == 0 {
            return Err(Error::Truncated);
        }
        // Default settings: no scaling, so the output is the image.
        if (c.output_width, c.output_height) != (w, h) || c.output_components != components {
            return Err(Error::Corrupt(format!(
                "unexpected output {}x{}x{}",
                c.output_width, c.output_height, c.output_components
            )));
        }
        let (w, h, n) = (w as usize, h as usize, components as usize);
        let mut rgb = Vec::new();
        rgb.try_reserve_exact(w * h * 3)
            .map_err(|_| Error::TooLarge)?;
        rgb.resize(w * h * 3, 0);
        let mut row = vec![0u8; w * n];
        for y in 0..h {
            let mut rows = [row.as_mut_ptr()];
            if ffi::jpeg_read_scanlines(c, rows.as_mut_ptr(), 1) != 1 {
                return Err(Error::Truncated);
            }
            let out = &mut rgb[y * w * 3..(y + 1) * w * 3];
            match kind {
                Kind::Rgb => out.copy_from_slice(&row),
                Kind::Gray => {
                    for (o, &v) in out.chunks_exact_mut(3).zip(&row) {
                        o.fill(v);
                    }
                }
                Kind::Cmyk => {
                    for (o, p) in out.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                        o.copy_from_slice(&cmyk_to_rgb([p[0], p[1], p[2], p[3]]));
                    }
                }
            }
        }
        // All rows are there: running out of data now is not an error here (a fatal error
        // still is).
        ffi::jpeg_finish_decompress(c);
        Ok(Jpeg {
            width: w,
            height: h,
            rgb,
            kind,
        })
    }
}

/// One pixel of libjpeg's CMYK output as Pillow converts it: read as "CMYK;I" (inverted, the
/// Adobe convention Pillow assumes for every CMYK JPEG), then `convert("RGB")` (`cmyk2rgb`:
/// `nk - c * nk / 255` rounded as Pillow's `MULDIV255`, with `nk = 255 - k`).
pub fn cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - v as i32);
    let nk = 255 - k;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v)).clamp(0, 255) as u8)
}
