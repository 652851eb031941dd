//! PyTorch `.bin`/`.pt` checkpoints: a zip archive holding a pickle (`data.pkl`) that
//! describes the tensors and one entry per storage (`data/<key>`) with the raw bytes.
//!
//! The pickle is read by a *safe* unpickler: a small stack machine that knows the opcodes a
//! state dict uses and the few callables that rebuild tensors. It never imports or calls
//! anything; every other global is refused by name as soon as it appears. Storages stay in the
//! memory-mapped file until a tensor is copied out, so loading needs the model's size once.

use super::{Bytes, DType, TensorSource};
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: DType,
    pub storage_key: String,
    pub storage_numel: u64,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<Vec<Value>>),
    Dict(Rc<Vec<(Value, Value)>>),
    Global(Callable),
    Storage(Rc<(DType, String, u64)>),
    Tensor(Rc<TensorRef>),
}

/// The only globals a state dict needs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Callable {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    StorageType(DType),
}

fn allowed_global(module: &str, name: &str) -> Option<Callable> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch", "FloatStorage") => Callable::StorageType(DType::F32),
        ("torch", "HalfStorage") => Callable::StorageType(DType::F16),
        ("torch", "BFloat16Storage") => Callable::StorageType(DType::BF16),
        ("torch", "DoubleStorage") => Callable::StorageType(DType::F64),
        ("torch", "LongStorage") => Callable::StorageType(DType::I64),
        ("torch", "IntStorage") => Callable::StorageType(DType::I32),
        ("torch", "ByteStorage") => Callable::StorageType(DType::U8),
        ("torch", "BoolStorage") => Callable::StorageType(DType::Bool),
        _ => return None,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool => "bool",
        Value::Int(_) => "int",
        Value::Float => "float",
        Value::Str(_) => "str",
        Value::Bytes => "bytes",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global(_) => "global",
        Value::Storage(_) => "storage",
        Value::Tensor(_) => "tensor",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements copied so far; bounds the work a hostile file can cause.
    work: usize,
    work_limit: usize,
}

const MAX_DEPTH: usize = 100_000;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(
            n <= self.data.len() - self.pos,
            "pickle ends in the middle of an instruction at byte {}",
            self.pos
        );
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle: unterminated GLOBAL name")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).context("pickle: GLOBAL name is not UTF-8")
    }
    fn push(&mut self, v: Value) -> Result<()> {
        ensure!(self.stack.len() < MAX_DEPTH, "pickle: stack too deep");
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value> {
        if let Some(&m) = self.marks.last() {
            ensure!(self.stack.len() > m, "pickle: pop across a MARK");
        }
        self.stack.pop().context("pickle: stack underflow")
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("pickle: no MARK to pop to")?;
        ensure!(m <= self.stack.len(), "pickle: MARK beyond the stack");
        Ok(self.stack.split_off(m))
    }
    fn top_mut(&mut self) -> Result<&mut Value> {
        if let Some(&m) = self.marks.last() {
            ensure!(self.stack.len() > m, "pickle: no object above the MARK");
        }
        self.stack.last_mut().context("pickle: stack underflow")
    }
    fn charge(&mut self, n: usize) -> Result<()> {
        self.work += n;
        ensure!(
            self.work <= self.work_limit,
            "pickle: too much work for its size (a hostile or broken file)"
        );
        Ok(())
    }
    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .context("pickle: string is not UTF-8")?
                .into(),
        ))
    }
    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .context("pickle: memo of an empty stack")?
            .clone();
        ensure!(self.memo.len() < 10_000_000, "pickle: memo too large");
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .with_context(|| format!("pickle: memo key {key} was never stored"))?
            .clone();
        self.push(v)
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    ensure!(proto <= 5, "pickle: unknown protocol {proto}");
                }
                0x95 => {
                    self.u64()?; // FRAME: a hint only
                }
                b'.' => {
                    ensure!(self.marks.is_empty(), "pickle: STOP inside a MARK");
                    return self.pop();
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Value::Dict(Rc::default()))?,
                b']' => self.push(Value::List(Rc::default()))?,
                b')' => self.push(Value::Tuple(Rc::default()))?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool)?,
                0x89 => self.push(Value::Bool)?,
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    ensure!(n <= 8, "pickle: integer of {n} bytes is too large");
                    let b = self.take(n)?;
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                    {
                        let _ = v;
                        self.push(Value::Float)?
                    }
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?)?;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'B' | b'C' => {
                    let n = if op == b'B' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?;
                    {
                        let _ = b;
                        self.push(Value::Bytes)?
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.global(&m, &n)?
                        }
                        _ => bail!("pickle: STACK_GLOBAL needs two strings"),
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    ensure!(items.len() % 2 == 0, "pickle: SETITEMS with an odd count");
                    self.extend_dict(items)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_storage(&pid)?;
                    self.push(storage)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD sets attributes (a state dict's `_metadata`); nothing we need.
                    let _state = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => bail!("pickle: BUILD on a {}", type_name(other)),
                    }
                }
                _ => bail!(
                    "pickle: opcode 0x{op:02x} at byte {at} is not one a PyTorch state dict uses"
                ),
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed_global(module, name) {
            Some(c) => self.push(Value::Global(c)),
            None => bail!(
                "refusing to load: the pickle names the global `{module}.{name}`, which a \
                 PyTorch state dict never needs (igpt never runs code from a checkpoint)"
            ),
        }
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<()> {
        let n = items.len();
        let list = match self.top_mut()? {
            Value::List(l) => l,
            other => bail!("pickle: APPEND to a {}", type_name(other)),
        };
        let copied = if Rc::strong_count(list) > 1 {
            list.len()
        } else {
            0
        };
        Rc::make_mut(list).extend(items);
        self.charge(copied + n)
    }

    fn extend_dict(&mut self, flat: Vec<Value>) -> Result<()> {
        let n = flat.len();
        let dict = match self.top_mut()? {
            Value::Dict(d) => d,
            other => bail!("pickle: SETITEM on a {}", type_name(other)),
        };
        let copied = if Rc::strong_count(dict) > 1 {
            dict.len()
        } else {
            0
        };
        let d = Rc::make_mut(dict);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        self.charge(copied + n)
    }
}

fn int(v: &Value, what: &str) -> Result<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => bail!(
            "pickle: {what} should be a non-negative int, not {}",
            type_name(other)
        ),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| int(x, what)).collect(),
        other => bail!("pickle: {what} should be a tuple, not {}", type_name(other)),
    }
}

/// `('storage', StorageType, key, location, numel)`.
fn persistent_storage(pid: &Value) -> Result<Value> {
    let Value::Tuple(t) = pid else {
        bail!("pickle: persistent id is a {}, not a tuple", type_name(pid));
    };
    match t.as_slice() {
        [
            Value::Str(tag),
            Value::Global(Callable::StorageType(dt)),
            Value::Str(key),
            _location,
            numel,
        ] if &**tag == "storage" => Ok(Value::Storage(Rc::new((
            *dt,
            key.to_string(),
            int(numel, "storage size")?,
        )))),
        _ => bail!("pickle: persistent id is not a ('storage', type, key, location, size) tuple"),
    }
}

fn reduce(f: Value, args: Value) -> Result<Value> {
    let Value::Global(c) = f else {
        bail!(
            "pickle: REDUCE calls a {}, not a known function",
            type_name(&f)
        );
    };
    let Value::Tuple(args) = args else {
        bail!("pickle: REDUCE arguments are a {}", type_name(&args));
    };
    match c {
        Callable::OrderedDict => {
            ensure!(args.is_empty(), "pickle: OrderedDict with arguments");
            Ok(Value::Dict(Rc::default()))
        }
        Callable::RebuildParameter => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => bail!("pickle: _rebuild_parameter without a tensor"),
        },
        Callable::RebuildTensorV2 => {
            ensure!(
                args.len() >= 4,
                "pickle: _rebuild_tensor_v2 with {} arguments",
                args.len()
            );
            let Value::Storage(s) = &args[0] else {
                bail!("pickle: _rebuild_tensor_v2 of a {}", type_name(&args[0]));
            };
            let t = TensorRef {
                dtype: s.0,
                storage_key: s.1.clone(),
                storage_numel: s.2,
                offset: int(&args[1], "storage offset")?,
                shape: ints(&args[2], "tensor size")?,
                stride: ints(&args[3], "tensor stride")?,
            };
            ensure!(
                t.shape.len() == t.stride.len(),
                "pickle: tensor size and stride differ in rank"
            );
            Ok(Value::Tensor(Rc::new(t)))
        }
        Callable::StorageType(_) => bail!("pickle: a storage type called as a function"),
    }
}

/// Runs the unpickler on `data.pkl` and returns the state dict's tensors by name, in order.
pub fn read_state_dict(pickle: &[u8]) -> Result<Vec<(String, TensorRef)>> {
    let m = Machine {
        data: pickle,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        work: 0,
        work_limit: 16 * pickle.len() + 1_000_000,
    };
    let top = m.run()?;
    let Value::Dict(items) = top else {
        bail!(
            "the pickle holds a {}, not a state dict (a dict of tensors)",
            type_name(&top)
        );
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items.iter() {
        let Value::Str(name) = k else {
            bail!("state dict key is a {}, not a string", type_name(k));
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), (**t).clone())),
            other => bail!(
                "state dict entry {name} is a {}, not a tensor",
                type_name(other)
            ),
        }
    }
    Ok(out)
}

/// A PyTorch zip checkpoint, memory-mapped.
pub struct TorchZip {
    path: PathBuf,
    map: Bytes,
    tensors: Vec<(String, TensorRef)>,
    /// Storage key -> byte range in the file.
    storages: HashMap<String, std::ops::Range<usize>>,
}

impl TorchZip {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(path, Bytes::map(path)?)
    }

    /// Parses contents already in memory; `path` names them in messages.
    pub fn from_bytes(path: &Path, map: Bytes) -> Result<Self> {
        let ctx = || format!("{} is not a readable PyTorch checkpoint", path.display());
        if map.len() >= 2 && map[0] == 0x80 {
            bail!(
                "{} is a PyTorch checkpoint in the legacy (pre-1.6) format; re-save it with a \
                 recent torch (`torch.save(torch.load(f), f)`) or use model.safetensors",
                path.display()
            );
        }
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..])).with_context(ctx)?;
        let pkl_name = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .map(|n| n.to_string())
            .with_context(|| format!("{}: the zip holds no data.pkl", path.display()))?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        let pickle = {
            use std::io::Read;
            let mut f = zip.by_name(&pkl_name).with_context(ctx)?;
            ensure!(
                f.size() <= 1 << 30,
                "{}: data.pkl is implausibly large",
                path.display()
            );
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .with_context(|| format!("{}: data.pkl is corrupt", path.display()))?;
            buf
        };
        let tensors = read_state_dict(&pickle).with_context(|| path.display().to_string())?;
        let mut storages = HashMap::new();
        for (name, t) in &tensors {
            if storages.contains_key(&t.storage_key) {
                continue;
            }
            let entry = format!("{prefix}data/{}", t.storage_key);
            let f = zip.by_name(&entry).with_context(|| {
                format!(
                    "{}: tensor {name} needs storage {entry}, which the zip lacks (truncated file?)",
                    path.display()
                )
            })?;
            ensure!(
                f.compression() == zip::CompressionMethod::Stored,
                "{}: storage {entry} is compressed; PyTorch never writes that",
                path.display()
            );
            let start = f.data_start().context("zip entry without a data offset")? as usize;
            let len = f.size() as usize;
            let range = start..start.checked_add(len).context("zip entry overflows")?;
            ensure!(
                range.end <= map.len(),
                "{}: storage {entry} runs past the end of the file (truncated download?)",
                path.display()
            );
            ensure!(
                crc32fast::hash(&map[range.clone()]) == f.crc32(),
                "{}: storage {entry} fails its CRC check (corrupt file)",
                path.display()
            );
            storages.insert(t.storage_key.clone(), range);
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tensors,
            storages,
        })
    }

    fn get(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.iter().find(|t| t.0 == name).map(|t| &t.1)
    }
}

impl TensorSource for TorchZip {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.0.clone()).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name)
            .map(|t| t.shape.iter().map(|&x| x as usize).collect())
    }

    fn read_into(&self, name: &str, dst: &mut [f32]) -> Result<()> {
        let t = self
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let bytes = &self.map[self.storages[&t.storage_key].clone()];
        let size = t.dtype.size();
        ensure!(
            (bytes.len() as u64) >= t.storage_numel.saturating_mul(size as u64),
            "{}: storage of {name} holds {} bytes, its header says {} elements",
            self.path.display(),
            bytes.len(),
            t.storage_numel
        );
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &n| a.checked_mul(n))
            .with_context(|| {
                format!(
                    "{}: tensor {name} has an impossible shape",
                    self.path.display()
                )
            })?;
        ensure!(
            numel == dst.len() as u64,
            "{}: tensor {name} has {numel} elements, expected {}",
            self.path.display(),
            dst.len()
        );
        if numel == 0 {
            return Ok(());
        }
        // Largest element index the view touches, in u128: no shape, stride or offset of
        // 64 bits can overflow it (a wrapped sum would pass the bounds check).
        let last = t.offset as u128
            + t.shape
                .iter()
                .zip(&t.stride)
                .map(|(&n, &s)| (n as u128 - 1) * s as u128)
                .sum::<u128>();
        ensure!(
            last < t.storage_numel as u128,
            "{}: tensor {name} reaches element {last} of a storage of {}",
            self.path.display(),
            t.storage_numel
        );
        let mut expect = 1u64;
        let contiguous = t.shape.iter().zip(&t.stride).rev().all(|(&n, &s)| {
            let ok = n == 1 || s == expect;
            expect *= n;
            ok
        });
        if contiguous {
            let start = t.offset as usize * size;
            t.dtype
                .convert(&bytes[start..start + dst.len() * size], dst);
            return Ok(());
        }
        let mut index = vec![0u64; t.shape.len()];
        for out in dst.iter_mut() {
            let e = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
            *out = t.dtype.to_f32(&bytes[e as usize * size..][..size]);
            for k in (0..index.len()).rev() {
                index[k] += 1;
                if index[k] < t.shape[k] {
                    break;
                }
                index[k] = 0;
            }
        }
        Ok(())
    }
}
