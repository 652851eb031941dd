//! Reading and writing NumPy `.npy` arrays (format versions 1-3, little-endian, C order).

use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

/// Element types igpt reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    U8,
    U16,
    I32,
    I64,
    F32,
    F64,
}

impl DType {
    fn descr(self) -> &'static str {
        match self {
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
        }
    }
    fn from_descr(s: &str) -> Option<Self> {
        Some(match s {
            "|u1" | "<u1" | "u1" => DType::U8,
            "<u2" => DType::U16,
            "<i4" => DType::I32,
            "<i8" => DType::I64,
            "<f4" => DType::F32,
            "<f8" => DType::F64,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

/// An array read from disk: shape, element type and raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

impl Array {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values as f64, whatever the stored type.
    pub fn to_f64(&self) -> Vec<f64> {
        let s = self.dtype.size();
        self.data
            .chunks_exact(s)
            .map(|b| match self.dtype {
                DType::U8 => b[0] as f64,
                DType::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
                DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
                DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
                DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
                DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            })
            .collect()
    }
    /// Values as i64 for an integer array; an error for floats.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        ensure!(
            !matches!(self.dtype, DType::F32 | DType::F64),
            "expected an integer array, found {} (float)",
            self.dtype.descr()
        );
        Ok(self.to_f64().into_iter().map(|v| v as i64).collect())
    }
}

/// Parses a `.npy` file held in memory.
pub fn parse(bytes: &[u8]) -> Result<Array> {
    ensure!(
        bytes.len() >= 10 && &bytes[..6] == b"\x93NUMPY",
        "not a NumPy .npy file (bad magic)"
    );
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated .npy header");
            (
                u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy format version {v}"),
    };
    ensure!(bytes.len() >= start + header_len, "truncated .npy header");
    let header = std::str::from_utf8(&bytes[start..start + header_len])
        .context(".npy header is not text")?;
    let field = |key: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{key}'"))
            .with_context(|| format!(".npy header lacks '{key}'"))?;
        Ok(header[at + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr_s = field("descr")?;
    let descr = descr_s
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or("");
    let dtype = DType::from_descr(descr).with_context(|| {
        format!("unsupported .npy dtype '{descr}': igpt reads uint8, uint16, int32, int64, float32 and float64 (little-endian)")
    })?;
    ensure!(
        field("fortran_order")?.starts_with("False"),
        "Fortran-ordered .npy arrays are not supported; save with C order"
    );
    let shape_s = field("shape")?;
    let inner = shape_s
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("");
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad .npy shape entry '{s}'"))
        })
        .collect::<Result<_>>()?;
    let data = &bytes[start + header_len..];
    let need = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .with_context(|| format!(".npy shape {shape:?} is larger than any array"))?;
    ensure!(
        data.len() >= need,
        "truncated .npy data: shape {shape:?} needs {need} bytes, file holds {}",
        data.len()
    );
    Ok(Array {
        shape,
        dtype,
        data: data[..need].to_vec(),
    })
}

pub fn read(path: &Path) -> Result<Array> {
    let bytes = crate::fsutil::read_regular(path)?;
    parse(&bytes).with_context(|| format!("in {}", path.display()))
}

/// Encodes an array as `.npy` (version 1.0) bytes.
pub fn encode(shape: &[usize], dtype: DType, data: &[u8]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>() * dtype.size(), data.len());
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}",
        dtype.descr()
    );
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn encode_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    encode(shape, DType::F32, &data)
}
