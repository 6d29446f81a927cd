//! Named weights for the model modules, read from memory-mapped safetensors files (or made up, for test and
//! benchmark models), converted to the caller's device and dtype as each module asks for them.
//!
//! Modules ask by diffusers' own parameter names (`down_blocks.0.resnets.1.conv1.weight`) with the shape their
//! config implies, so a missing tensor or a wrong shape is an error naming both, never a panic later.
use crate::error::{Error, Result};
use safetensors::tensor::Dtype;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
}

#[derive(Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    range: (usize, usize),
}

enum Source {
    /// Tensors read from one or more safetensors files.
    Files { files: Vec<MappedFile>, entries: HashMap<String, Entry> },
    /// Random values of the asked shape: a random-weight test or benchmark model. Matrices are drawn
    /// N(0, 1/fan_in), 1-D weights are ones and biases zeros, so activations stay in range in fp16.
    Random,
    /// No values at all: each tensor is a broadcast zero of the asked shape. Used to count parameters.
    ShapesOnly,
}

struct Store {
    source: Source,
    device: Device,
    kind: Kind,
    /// How the files name their tensors when that differs from the names modules ask for (see
    /// [`Weights::from_safetensors_renamed`]); errors add it.
    layout: Option<String>,
    used: RefCell<HashSet<String>>,
    requested: RefCell<BTreeMap<String, Vec<i64>>>,
    /// A shallow clone (same storage) of every tensor handed out, by full name: LoRAs patch weights in place
    /// through these after loading (see `models::lora`).
    handed: RefCell<HashMap<String, Tensor>>,
}

/// A handle on a weight store plus a name prefix; cheap to clone. `w.sub("conv1").get("weight", &[..])`.
#[derive(Clone)]
pub struct Weights {
    store: Rc<Store>,
    prefix: String,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// One tensor of a [`Weights::from_renamed`] store: the stored tensor `stored` seen as `name`; with `chunk`
/// `(i, n)` only its `i`-th of `n` equal parts along the first dimension (a fused q/k/v projection split, still
/// one contiguous byte range); with `shape`, viewed in that shape instead (same element count).
#[derive(Debug, Clone, PartialEq)]
pub struct Renamed {
    pub name: String,
    pub stored: String,
    pub chunk: Option<(usize, usize)>,
    pub shape: Option<Vec<i64>>,
}

/// The names and shapes of the tensors in a safetensors file, read from its header (the file is memory-mapped,
/// not read). A truncated or malformed file is an error naming it.
pub fn stored_shapes(path: &Path) -> Result<HashMap<String, Vec<i64>>> {
    let (_, entries) = map_file(path)?;
    Ok(entries.into_iter().map(|(k, e)| (k, e.shape)).collect())
}

/// Maps a safetensors file and reads its header (entries with `file` 0), checking every tensor lies in it.
fn map_file(path: &Path) -> Result<(MappedFile, HashMap<String, Entry>)> {
    let path = path.to_path_buf();
    let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: the file is opened read-only; weights files are not expected to change while loaded.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::WeightFile { path: path.clone(), msg: e.to_string() })?;
    let data_start = 8 + header_len;
    let mut entries = HashMap::new();
    for (name, info) in meta.tensors() {
        let (start, end) = info.data_offsets;
        if data_start + end > mmap.len() || start > end {
            return Err(Error::WeightFile {
                path: path.clone(),
                msg: format!("tensor `{name}` points past the end of the file (truncated?)"),
            });
        }
        let shape = info.shape.iter().map(|&d| d as i64).collect();
        entries.insert(name.clone(), Entry { file: 0, dtype: info.dtype, shape, range: (start, end) });
    }
    Ok((MappedFile { path, mmap, data_start }, entries))
}

impl Weights {
    /// Memory-maps the given safetensors files (a model's weights may be sharded across several).
    pub fn from_safetensors<P: AsRef<Path>>(paths: &[P], device: Device, kind: Kind) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let (file, stored) = map_file(p.as_ref())?;
            entries.extend(stored.into_iter().map(|(name, e)| (name, Entry { file: i, ..e })));
            files.push(file);
        }
        Ok(Self::with_source(Source::Files { files, entries }, device, kind, None))
    }

    /// Like [`Weights::from_safetensors`], with every stored tensor seen under `rename(stored name)`: files written
    /// in another key layout, read by the names the modules ask for (nothing is copied). `layout` says how the
    /// files name their tensors; missing-tensor and shape errors add it. Two stored tensors that would get the
    /// same name are an error naming both.
    pub fn from_safetensors_renamed<P: AsRef<Path>>(
        paths: &[P],
        device: Device,
        kind: Kind,
        rename: impl Fn(&str) -> String,
        layout: &str,
    ) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut stored_as: HashMap<String, String> = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let (file, stored) = map_file(p.as_ref())?;
            let mut stored: Vec<(String, Entry)> = stored.into_iter().collect();
            stored.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, e) in stored {
                let seen = rename(&name);
                if let Some(other) = stored_as.insert(seen.clone(), name.clone()) {
                    return Err(Error::WeightFile {
                        path: p.as_ref().to_path_buf(),
                        msg: format!("tensors `{other}` and `{name}` both stand for `{seen}` ({layout})"),
                    });
                }
                entries.insert(seen, Entry { file: i, ..e });
            }
            files.push(file);
        }
        Ok(Self::with_source(Source::Files { files, entries }, device, kind, Some(layout.to_string())))
    }

    /// Memory-maps one safetensors file and exposes its tensors under other names: each [`Renamed`] entry
    /// makes the stored tensor `stored` available as `name`, optionally viewed with another shape of the same
    /// number of elements (a 1x1 convolution weight read as a linear one). Stored tensors the plan does not
    /// name are invisible. Nothing is copied: the tensors are read from the mapping as modules ask for them.
    pub fn from_renamed(path: &Path, plan: &[Renamed], device: Device, kind: Kind) -> Result<Self> {
        let (file, stored) = map_file(path)?;
        let mut entries = HashMap::with_capacity(plan.len());
        for r in plan {
            let e = stored.get(&r.stored).ok_or_else(|| Error::MissingTensor {
                name: r.stored.clone(),
                origin: path.display().to_string(),
            })?;
            let mut e = e.clone();
            if let Some((i, n)) = r.chunk {
                let rows = e.shape.first().copied().unwrap_or(0) as usize;
                let bytes = e.range.1 - e.range.0;
                if n == 0 || i >= n || rows % n != 0 || bytes % n != 0 {
                    return Err(Error::WeightFile {
                        path: path.to_path_buf(),
                        msg: format!(
                            "tensor `{}` of shape {:?} cannot be split in {n} parts",
                            r.stored, e.shape
                        ),
                    });
                }
                let part = bytes / n;
                e.range = (e.range.0 + i * part, e.range.0 + (i + 1) * part);
                e.shape[0] = (rows / n) as i64;
            }
            if let Some(shape) = &r.shape {
                if shape.iter().product::<i64>() != e.shape.iter().product::<i64>() {
                    return Err(Error::ShapeMismatch {
                        name: r.stored.clone(),
                        expected: shape.clone(),
                        found: e.shape,
                        origin: path.display().to_string(),
                    });
                }
                e.shape = shape.clone();
            }
            entries.insert(r.name.clone(), e);
        }
        Ok(Self::with_source(Source::Files { files: vec![file], entries }, device, kind, None))
    }

    /// A random-weight model (test or benchmark model: its outputs mean nothing).
    pub fn random(device: Device, kind: Kind) -> Self {
        Self::with_source(Source::Random, device, kind, None)
    }

    /// A store that hands out broadcast zeros: builds a model's structure without memory, to count parameters.
    pub fn shapes_only(kind: Kind) -> Self {
        Self::with_source(Source::ShapesOnly, Device::Cpu, kind, None)
    }

    fn with_source(source: Source, device: Device, kind: Kind, layout: Option<String>) -> Self {
        let store = Store {
            source,
            device,
            kind,
            layout,
            used: RefCell::new(HashSet::new()),
            requested: RefCell::new(BTreeMap::new()),
            handed: RefCell::new(HashMap::new()),
        };
        Weights { store: Rc::new(store), prefix: String::new() }
    }

    /// The same store under `prefix.name`.
    pub fn sub(&self, name: impl std::fmt::Display) -> Self {
        let prefix =
            if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Weights { store: self.store.clone(), prefix }
    }

    /// The full dotted name this handle stands for.
    pub fn prefix_name(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self) -> Device {
        self.store.device
    }

    pub fn kind(&self) -> Kind {
        self.store.kind
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    fn origin(&self) -> String {
        match &self.store.source {
            Source::Files { files, .. } => self.with_layout(
                files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", "),
            ),
            Source::Random => "random test weights".into(),
            Source::ShapesOnly => "shape-only weights".into(),
        }
    }

    /// `files`, followed by the files' key layout when the store renames their tensors.
    fn with_layout(&self, files: String) -> String {
        match &self.store.layout {
            Some(layout) => format!("{files}, {layout}"),
            None => files,
        }
    }

    /// Whether the weights hold `name` (for optional tensors such as biases). Random and shape-only stores
    /// hold everything.
    pub fn contains(&self, name: &str) -> bool {
        match &self.store.source {
            Source::Files { entries, .. } => entries.contains_key(&self.full_name(name)),
            _ => true,
        }
    }

    /// The stored shape of `name`, where the file has it.
    pub fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        match &self.store.source {
            Source::Files { entries, .. } => entries.get(&self.full_name(name)).map(|e| e.shape.clone()),
            _ => None,
        }
    }

    /// The tensor `name` with the given shape, on the store's device, in the store's dtype.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_kind(name, shape, self.store.kind)
    }

    /// Like [`Weights::get`] with an explicit dtype (some buffers stay in fp32).
    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let full = self.full_name(name);
        let store = &*self.store;
        store.requested.borrow_mut().insert(full.clone(), shape.to_vec());
        let t = match &store.source {
            Source::Files { files, entries } => {
                let e = entries
                    .get(&full)
                    .ok_or_else(|| Error::MissingTensor { name: full.clone(), origin: self.origin() })?;
                if e.shape != shape {
                    return Err(Error::ShapeMismatch {
                        name: full,
                        expected: shape.to_vec(),
                        found: e.shape.clone(),
                        origin: self.with_layout(files[e.file].path.display().to_string()),
                    });
                }
                let f = &files[e.file];
                let file_kind = kind_of(e.dtype).ok_or_else(|| Error::WeightFile {
                    path: f.path.clone(),
                    msg: format!("tensor `{full}` has unsupported dtype {:?}", e.dtype),
                })?;
                let bytes = &f.mmap[f.data_start + e.range.0..f.data_start + e.range.1];
                let expected_len = shape.iter().product::<i64>() as usize * file_kind.elt_size_in_bytes();
                if bytes.len() != expected_len {
                    return Err(Error::WeightFile {
                        path: f.path.clone(),
                        msg: format!(
                            "tensor `{full}` holds {} bytes, its shape needs {expected_len}",
                            bytes.len()
                        ),
                    });
                }
                store.used.borrow_mut().insert(full);
                Tensor::f_from_data_size(bytes, shape, file_kind)?
                    .f_to_kind(kind)?
                    .f_to_device(store.device)?
            }
            Source::Random => {
                let opts = (Kind::Float, store.device);
                let is_bias = name.ends_with("bias");
                let t = if shape.len() >= 2 {
                    let fan_in: i64 = shape[1..].iter().product();
                    Tensor::f_randn(shape, opts)? * (1.0 / (fan_in.max(1) as f64).sqrt())
                } else if is_bias {
                    Tensor::f_zeros(shape, opts)?
                } else {
                    Tensor::f_ones(shape, opts)?
                };
                t.f_to_kind(kind)?
            }
            Source::ShapesOnly => Tensor::f_zeros([], (kind, Device::Cpu))?.f_expand(shape, false)?,
        };
        if !matches!(store.source, Source::ShapesOnly) {
            store.handed.borrow_mut().insert(self.full_name(name), t.shallow_clone());
        }
        Ok(t)
    }

    /// The tensor a module was given for `name` (relative to this handle), sharing its storage: writing to it
    /// in place changes the module's weight. `None` when no module asked for it.
    pub fn loaded(&self, name: &str) -> Option<Tensor> {
        self.store.handed.borrow().get(&self.full_name(name)).map(|t| t.shallow_clone())
    }

    /// Full names of the tensors handed out to modules under this handle's prefix, sorted.
    pub fn loaded_names(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.store.handed.borrow().keys().filter(|k| k.starts_with(&self.prefix)).cloned().collect();
        v.sort();
        v
    }

    /// Names of stored tensors under this handle's prefix that no module asked for (a config that does not
    /// match its weights shows up here).
    pub fn unused(&self) -> Vec<String> {
        match &self.store.source {
            Source::Files { entries, .. } => {
                let used = self.store.used.borrow();
                let mut v: Vec<String> = entries
                    .keys()
                    .filter(|k| k.starts_with(&self.prefix) && !used.contains(*k))
                    .cloned()
                    .collect();
                v.sort();
                v
            }
            _ => Vec::new(),
        }
    }

    /// Full names of the tensors asked for so far under this handle's prefix (any store), sorted.
    pub fn requested_names(&self) -> Vec<String> {
        self.store.requested.borrow().keys().filter(|k| k.starts_with(&self.prefix)).cloned().collect()
    }

    /// Number of parameters asked for so far under this handle's prefix.
    pub fn requested_parameter_count(&self) -> i64 {
        self.store
            .requested
            .borrow()
            .iter()
            .filter(|(k, _)| k.starts_with(&self.prefix))
            .map(|(_, s)| s.iter().product::<i64>())
            .sum()
    }
}
