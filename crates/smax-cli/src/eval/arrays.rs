//! Arrays in NumPy (`.npy`, `.npz`) and safetensors files, read chunk by chunk in file order:
//! bytes stored as they are (`.npy`, safetensors, an `.npz` written by `np.savez`) are read
//! from their offset; a compressed `.npz` entry (`np.savez_compressed`) is inflated as it is
//! read. One pass holds one chunk in memory, whatever the file size. Plain reads rather than a
//! memory map: a map needs `unsafe` (another process may truncate the file under it), and the
//! chunk is copied into an f32 buffer either way, so a map would save one copy at ~10 GB/s.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

/// Element types the reader converts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U64 => "u64",
            DType::U32 => "u32",
            DType::U16 => "u16",
            DType::U8 => "u8",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// NumPy's `descr` (little-endian or byte-sized only). `V2` is how `np.save` records
    /// ml_dtypes' `bfloat16` (a 2-byte record with no type of its own).
    fn from_npy(descr: &str) -> Result<DType, String> {
        let d = descr.trim_start_matches(['<', '|', '=']);
        if descr.starts_with('>') && !d.ends_with('1') {
            return Err(format!("big-endian arrays ('{descr}') are not supported"));
        }
        Ok(match d.trim_start_matches('>') {
            "f8" => DType::F64,
            "f4" => DType::F32,
            "f2" => DType::F16,
            "V2" | "bfloat16" => DType::BF16,
            "i8" => DType::I64,
            "i4" => DType::I32,
            "i2" => DType::I16,
            "i1" => DType::I8,
            "u8" => DType::U64,
            "u4" => DType::U32,
            "u2" => DType::U16,
            "u1" | "b1" => DType::U8,
            _ => return Err(format!("unsupported dtype '{descr}'")),
        })
    }

    fn from_safetensors(d: &str) -> Result<DType, String> {
        Ok(match d {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U64" => DType::U64,
            "U32" => DType::U32,
            "U16" => DType::U16,
            "U8" | "BOOL" => DType::U8,
            other => return Err(format!("unsupported dtype {other}")),
        })
    }
}

/// Where an array's bytes are: the file, the offset of its first byte (of the data, or of the
/// deflate stream holding header and data), and whether they are deflated.
struct Src {
    path: PathBuf,
    start: u64,
    deflated: bool,
}

/// One array of a file: its element type, shape and where its bytes are.
pub struct Array {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// `file` or `file:key`, for messages.
    pub name: String,
    /// Bytes of data (elements × size, checked).
    pub bytes: usize,
    src: Src,
}

fn open_at(path: &Path, at: u64, name: &str) -> Result<File, String> {
    let mut f = File::open(path).map_err(|e| format!("{name}: {e}"))?;
    f.seek(SeekFrom::Start(at)).map_err(|e| format!("{name}: {e}"))?;
    Ok(f)
}

/// Reads up to `n` bytes from `r` (fewer at its end).
fn read_up_to(r: impl Read, n: usize, name: &str) -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    r.take(n as u64).read_to_end(&mut v).map_err(|e| format!("{name}: {e}"))?;
    Ok(v)
}

fn checked_bytes(shape: &[usize], dtype: DType, name: &str) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{name}: shape {shape:?} overflows"))
}

/// The dictionary of an `.npy` header: `descr`, `fortran_order`, `shape`.
fn parse_npy_header(h: &str, name: &str) -> Result<(DType, Vec<usize>), String> {
    let field = |key: &str| -> Result<&str, String> {
        let at = h.find(&format!("'{key}'")).ok_or_else(|| format!("{name}: npy header has no '{key}'"))?;
        let rest = &h[at + key.len() + 2..];
        let colon = rest.find(':').ok_or_else(|| format!("{name}: bad npy header"))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| format!("{name}: unsupported npy dtype (structured arrays are not logits)"))?;
    if field("fortran_order")?.starts_with("True") {
        return Err(format!("{name}: Fortran-order arrays are not supported (save np.ascontiguousarray(x))"));
    }
    let shape = field("shape")?;
    let inner =
        shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| format!("{name}: bad shape"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("{name}: bad shape entry '{s}'")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((DType::from_npy(descr).map_err(|e| format!("{name}: {e}"))?, shape))
}

/// Header of an `.npy` image starting at `b` (magic, version, header length, dictionary):
/// returns the dtype, shape and the offset of the data.
fn npy_header(b: &[u8], name: &str) -> Result<(DType, Vec<usize>, usize), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(format!("{name}: not an .npy image"));
    }
    let (hlen, off): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("{name}: npy format version {v} is not supported")),
    };
    let end = off.checked_add(hlen).filter(|&e| e <= b.len()).ok_or_else(|| format!("{name}: truncated npy header"))?;
    let h = std::str::from_utf8(&b[off..end]).map_err(|_| format!("{name}: npy header is not text"))?;
    let (dtype, shape) = parse_npy_header(h, name)?;
    Ok((dtype, shape, end))
}

impl Array {
    /// Opens `key` of `path` (`.npy`: no key; `.npz` and safetensors: the key, or the only
    /// array when there is one).
    pub fn open(path: &Path, key: Option<&str>) -> Result<Array, String> {
        let disp = path.display().to_string();
        if cfg!(target_endian = "big") {
            // The readers view little-endian bytes as native numbers.
            return Err(format!("{disp}: reading arrays needs a little-endian machine"));
        }
        let len = std::fs::metadata(path).map_err(|e| format!("{disp}: {e}"))?.len();
        let head = read_up_to(open_at(path, 0, &disp)?, 1 << 16, &disp)?;
        if head.starts_with(b"\x93NUMPY") {
            if let Some(k) = key {
                return Err(format!("{disp}: an .npy file holds one array (no key '{k}')"));
            }
            let (dtype, shape, start) = npy_header(&head, &disp)?;
            return Array::stored(path, len, start as u64, dtype, shape, disp);
        }
        if head.starts_with(b"PK") {
            return Array::open_npz(path, len, key, disp);
        }
        Array::open_safetensors(path, len, &head, key, disp)
    }

    fn stored(
        path: &Path,
        len: u64,
        start: u64,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    ) -> Result<Array, String> {
        let bytes = checked_bytes(&shape, dtype, &name)?;
        if start.checked_add(bytes as u64).is_none_or(|e| e > len) {
            return Err(format!("{name}: the file is shorter than its shape {shape:?} needs"));
        }
        Ok(Array { dtype, shape, name, bytes, src: Src { path: path.to_path_buf(), start, deflated: false } })
    }

    fn open_npz(path: &Path, len: u64, key: Option<&str>, disp: String) -> Result<Array, String> {
        let f = File::open(path).map_err(|e| format!("{disp}: {e}"))?;
        let mut z = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| format!("{disp}: {e}"))?;
        let names = z
            .file_names()
            .map(|n| n.map(|n| n.trim_end_matches(".npy").to_string()))
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| format!("{disp}: {e}"))?;
        let want = match key {
            Some(k) => k.to_string(),
            None if names.len() == 1 => names[0].clone(),
            None => {
                return Err(format!(
                    "{disp}: holds {} arrays ({}); name one with a key",
                    names.len(),
                    names.join(", ")
                ));
            }
        };
        let name = format!("{disp}:{want}");
        let e = z
            .by_name(&format!("{want}.npy"))
            .map_err(|_| format!("{disp}: no array '{want}' (it holds {})", names.join(", ")))?;
        let start = e.data_start().ok_or_else(|| format!("{name}: entry has no data offset"))?;
        let method = e.compression();
        drop(e);
        match method {
            zip::CompressionMethod::Stored => {
                let head = read_up_to(open_at(path, start, &name)?, 1 << 16, &name)?;
                let (dtype, shape, off) = npy_header(&head, &name)?;
                Array::stored(path, len, start + off as u64, dtype, shape, name)
            }
            m if m == zip::CompressionMethod::DEFLATE => {
                let d = flate2::read::DeflateDecoder::new(BufReader::new(open_at(path, start, &name)?));
                let head = read_up_to(d, 1 << 16, &name)?;
                let (dtype, shape, _) = npy_header(&head, &name)?;
                let bytes = checked_bytes(&shape, dtype, &name)?;
                Ok(Array { dtype, shape, name, bytes, src: Src { path: path.to_path_buf(), start, deflated: true } })
            }
            other => Err(format!("{name}: compression {other:?} is not supported (np.savez or np.savez_compressed)")),
        }
    }

    /// safetensors: an 8-byte little-endian header length, a JSON header
    /// `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, the data.
    fn open_safetensors(path: &Path, len: u64, head: &[u8], key: Option<&str>, disp: String) -> Result<Array, String> {
        let not = || format!("{disp}: not an .npy, .npz or safetensors file");
        let n = u64::from_le_bytes(head.get(..8).ok_or_else(not)?.try_into().map_err(|_| not())?);
        if n > 100 << 20 || 8 + n > len {
            return Err(not());
        }
        let h = read_up_to(open_at(path, 8, &disp)?, n as usize, &disp)?;
        let j: serde_json::Value = serde_json::from_slice(&h).map_err(|e| format!("{}: {e}", not()))?;
        let obj = j.as_object().ok_or_else(not)?;
        let names: Vec<&String> = obj.keys().filter(|k| *k != "__metadata__").collect();
        let want = match key {
            Some(k) => k.to_string(),
            None if names.len() == 1 => names[0].clone(),
            None => {
                let list: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                return Err(format!(
                    "{disp}: holds {} tensors ({}); name one with a key",
                    names.len(),
                    list.join(", ")
                ));
            }
        };
        let name = format!("{disp}:{want}");
        let t =
            obj.get(&want).filter(|_| want != "__metadata__").ok_or_else(|| format!("{disp}: no tensor '{want}'"))?;
        let bad = || format!("{name}: bad header entry");
        let dtype =
            DType::from_safetensors(t["dtype"].as_str().ok_or_else(bad)?).map_err(|e| format!("{name}: {e}"))?;
        let shape = t["shape"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(bad))
            .collect::<Result<Vec<usize>, String>>()?;
        let offs = t["data_offsets"].as_array().ok_or_else(bad)?;
        let (b, e) = match (offs.first().and_then(|v| v.as_u64()), offs.get(1).and_then(|v| v.as_u64())) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(bad()),
        };
        let bytes = checked_bytes(&shape, dtype, &name)?;
        if e - b != bytes as u64 {
            return Err(format!("{name}: data_offsets hold {} bytes, shape {shape:?} needs {bytes}", e - b));
        }
        let start = (8 + n).checked_add(b).ok_or_else(|| format!("{name}: data offset {b} is past any file"))?;
        Array::stored(path, len, start, dtype, shape, name)
    }

    pub fn is_float(&self) -> bool {
        self.dtype.is_float()
    }

    /// A reader from the first element.
    pub fn reader(&self) -> Result<Reader<'_>, String> {
        let f = BufReader::with_capacity(1 << 20, open_at(&self.src.path, self.src.start, &self.name)?);
        let d: Box<dyn Read> = if self.src.deflated {
            let mut d = flate2::read::DeflateDecoder::new(f);
            let head = read_up_to(&mut d, 12, &self.name)?;
            let hl = match head.get(6) {
                Some(1) => 10 + u16::from_le_bytes([head[8], head[9]]) as u64,
                Some(_) if head.len() == 12 => 12 + u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64,
                _ => return Err(format!("{}: truncated npy header", self.name)),
            };
            std::io::copy(&mut (&mut d).take(hl - 12), &mut std::io::sink())
                .map_err(|e| format!("{}: {e}", self.name))?;
            Box::new(d)
        } else {
            Box::new(f)
        };
        Ok(Reader { d, buf: Vec::new(), name: &self.name })
    }
}

/// Sequential access to an array's bytes.
pub struct Reader<'a> {
    d: Box<dyn Read>,
    buf: Vec<u64>,
    name: &'a str,
}

impl Reader<'_> {
    /// The next `n` bytes, in a buffer aligned to 8 bytes (so any element type can view it).
    fn next(&mut self, n: usize) -> Result<&[u8], String> {
        let words = n.div_ceil(8);
        if self.buf.len() < words {
            self.buf.resize(words, 0);
        }
        let b = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.buf)[..n];
        self.d.read_exact(b).map_err(|e| format!("{}: {e}", self.name))?;
        Ok(b)
    }

    /// The next `n` elements as f32 into `out` (resized to `n`).
    pub fn read_f32(&mut self, dtype: DType, n: usize, out: &mut Vec<f32>) -> Result<(), String> {
        use half::slice::HalfFloatSliceExt;
        use rayon::prelude::*;
        out.resize(n, 0.0);
        if dtype == DType::F32 {
            let b = bytemuck::cast_slice_mut::<f32, u8>(out);
            return self.d.read_exact(b).map_err(|e| format!("{}: {e}", self.name));
        }
        let b = self.next(n * dtype.size())?;
        // Converted in parallel blocks: F16C converts 8 lanes per instruction, but one core
        // would still trail the two cores' reduction passes that follow.
        const BLK: usize = 1 << 16;
        match dtype {
            DType::F16 => out
                .par_chunks_mut(BLK)
                .zip(bytemuck::cast_slice::<u8, f16>(b).par_chunks(BLK))
                .for_each(|(o, h)| h.convert_to_f32_slice(o)),
            DType::BF16 => out
                .par_chunks_mut(BLK)
                .zip(bytemuck::cast_slice::<u8, bf16>(b).par_chunks(BLK))
                .for_each(|(o, h)| h.convert_to_f32_slice(o)),
            DType::F64 => {
                for (o, &v) in out.iter_mut().zip(bytemuck::cast_slice::<u8, f64>(b)) {
                    *o = v as f32;
                }
            }
            other => return Err(format!("logits: expected floating point, got {}", other.name())),
        }
        Ok(())
    }

    /// The next `n` elements as i64 labels into `out` (cleared first).
    pub fn read_i64(&mut self, dtype: DType, n: usize, out: &mut Vec<i64>) -> Result<(), String> {
        let b = self.next(n * dtype.size())?;
        out.clear();
        let w = dtype.size();
        let mut word = [0u8; 8];
        for c in b.chunks_exact(w) {
            word[..w].copy_from_slice(c);
            let u = u64::from_le_bytes(word);
            out.push(match dtype {
                DType::I64 => u as i64,
                DType::I32 => u as u32 as i32 as i64,
                DType::I16 => u as u16 as i16 as i64,
                DType::I8 => u as u8 as i8 as i64,
                // A u64 beyond i64::MAX is out of every class range: it maps to i64::MAX.
                DType::U64 => i64::try_from(u).unwrap_or(i64::MAX),
                DType::U32 | DType::U16 | DType::U8 => u as i64,
                other => return Err(format!("labels: expected integers, got {}", other.name())),
            });
            word = [0; 8];
        }
        Ok(())
    }
}
