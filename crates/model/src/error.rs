use std::path::PathBuf;

/// Everything that can go wrong between a model path and a generated token. Each message says
/// which file and which tensor, and what was expected against what was found.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // Not marked as the error's source: the message already says it, and `{:#}` would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor {name:?} not found")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {name:?} has unsupported type {dtype}")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(transparent)]
    Config(#[from] tessera_core::ConfigError),
    #[error(transparent)]
    Plan(#[from] tessera_core::PlanError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the prompt has {prompt} tokens but the model's context is {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Collective(#[from] tessera_collective::CollectiveError),
    /// Every worker of the mesh answered, and those that failed the step failed it in an
    /// all-reduce: the processes and their shards are well, the links between them are not
    /// (a network stall outlived the transport's timeout). Rebuilding the mesh mends it.
    #[error("the workers' all-reduce mesh broke: {0}")]
    MeshDown(String),
    #[error("shard {rank} failed: {msg}")]
    Shard { rank: usize, msg: String },
}

impl ModelError {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            error,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
