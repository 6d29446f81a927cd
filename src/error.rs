//! The library's one error type. Every failure a user can cause (a bad file, flag, frame or setting) maps to a
//! variant that names what was wrong; binaries add context with anyhow.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a valid safetensors file: {msg}")]
    WeightFile { path: PathBuf, msg: String },

    #[error("tensor `{name}` is missing from the weights ({origin})")]
    MissingTensor { name: String, origin: String },

    #[error("tensor `{name}` has shape {found:?} in {origin}, the config asks for {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<i64>, found: Vec<i64>, origin: String },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("invalid {what}: {msg}")]
    InvalidArgument { what: String, msg: String },

    #[error("image {what}: {msg}")]
    Image { what: String, msg: String },

    #[error("model {0}")]
    Model(String),

    /// CUDA is not usable here, or a CUDA graph, event, pinned allocation or copy failed (src/graph/cuda.rs).
    #[error("CUDA: {0}")]
    Cuda(String),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into(), msg: msg.into() }
    }
}
