//! Errors of loading and running embedders: each names the file or text involved and what
//! was expected.

use std::path::PathBuf;

/// Everything that can go wrong loading a model or embedding with it.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A model file is missing (config, tokenizer, weights).
    #[error("`{}`: {what} not found{hint}", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
        /// What was looked for ("config.json", "tokenizer.json", "weights (*.safetensors)").
        what: String,
        /// Extra advice, starting with "; " when present.
        hint: String,
    },
    /// A model file exists but is malformed or disagrees with another file.
    #[error("`{}`: {message}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// What was found and what was expected.
        message: String,
    },
    /// The model's architecture has no embedder here.
    #[error(
        "`{}`: unknown architecture `{arch}` (supported: bert and its relatives MiniLM/BGE/E5; \
         llama, mistral (Llama architecture) and qwen2 decoders)",
        path.display()
    )]
    UnknownArchitecture {
        /// The config or GGUF file naming the architecture.
        path: PathBuf,
        /// The architecture found there.
        arch: String,
    },
    /// A text tokenizes to more tokens than the model's context.
    #[error(
        "text {text:?} is {tokens} tokens, longer than the model's context of {max} tokens \
         (pass --truncate to cut it with a warning)"
    )]
    TooLong {
        /// The start of the offending text.
        text: String,
        /// Its token count.
        tokens: usize,
        /// The model's limit.
        max: usize,
    },
    /// A text tokenizes to no tokens at all (nothing to pool).
    #[error("text {text:?} has no tokens under this model's tokenizer")]
    Empty {
        /// The offending text.
        text: String,
    },
    /// The model produced NaN or an infinity.
    #[error(
        "the model produced a non-finite value ({value}) in the embedding of text #{row} of the \
         batch (dimension {index}); check the weights and the dtype"
    )]
    NonFinite {
        /// Row in the batch.
        row: usize,
        /// Dimension of the first bad value.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("`{}`: {io}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        io: std::io::Error,
    },
    /// Anything else the caller asked for that cannot be done (an option that does not apply).
    #[error("{0}")]
    Unsupported(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, EmbedError>;

pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> EmbedError {
    EmbedError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EmbedError + '_ {
    move |io| EmbedError::Io {
        path: path.to_path_buf(),
        io,
    }
}

/// The first characters of `text`, for error messages.
pub(crate) fn preview(text: &str) -> String {
    const N: usize = 80;
    if text.chars().count() <= N {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(N).collect();
        s.push('…');
        s
    }
}
