//! What identifies an embedding, independent of where it is stored.
//!
//! Embedding a text with an LLM is the expensive step of preparing a dataset, so embeddings
//! are computed once and cached in a store (see [`crate::io::store`]) keyed by *what was
//! embedded and how*: the embedder, the prompt template, and the rendered text. This module
//! holds the pure parts of that contract — the key function and the store's metadata — so
//! that every producer (the synthetic generator, an embedding worker) and every consumer
//! (training, evaluation) computes the same key for the same point.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version tag hashed into every key, so a future change of the key scheme cannot collide
/// with keys computed under this one.
const KEY_SCHEME: &str = "gpo-text-key/v1";

/// Length in characters of a key returned by [`text_key`] (hex SHA-256).
pub const KEY_LEN: usize = 64;

/// The key of one embedding: hex SHA-256 over the length-prefixed parts
/// `(scheme tag, embedder, template, text)`.
///
/// Each part is hashed as its byte length (u64, little-endian) followed by its UTF-8 bytes,
/// so distinct part tuples never hash the same input: `("ab", "c")` and `("a", "bc")`
/// produce different keys.
pub fn text_key(embedder: &str, template: &str, text: &str) -> String {
    let mut h = Sha256::new();
    for part in [KEY_SCHEME, embedder, template, text] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Whether `s` has the shape of a key from [`text_key`]: 64 lowercase hex digits.
pub fn is_key(s: &str) -> bool {
    s.len() == KEY_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a store's embeddings are: which model produced them, from which prompt template,
/// with how many dimensions, and whether they are synthetic (not from any LLM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMeta {
    /// Embedder identifier (a model name, or e.g. `synthetic-latent/v1`).
    pub embedder: String,
    /// Prompt template name (see [`crate::prompt::Template::name`]).
    pub template: String,
    /// Length of every embedding vector.
    pub dim: usize,
    /// True when the vectors come from the synthetic generator rather than an LLM.
    pub synthetic: bool,
}

impl StoreMeta {
    /// The key of `text` under this store's embedder and template.
    pub fn key(&self, text: &str) -> String {
        text_key(&self.embedder, &self.template, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_hex_and_length_prefixed() {
        let k = text_key("e", "plain", "hello");
        assert!(is_key(&k), "{k}");
        assert_eq!(k, text_key("e", "plain", "hello"));
        assert_ne!(text_key("ab", "c", "x"), text_key("a", "bc", "x"));
        assert_ne!(text_key("e", "ab", "c"), text_key("e", "a", "bc"));
        assert_ne!(text_key("e", "", "x"), text_key("", "e", "x"));
        assert_ne!(
            text_key("e", "plain", "hello"),
            text_key("e", "plain", "hello ")
        );
        assert_ne!(text_key("e", "plain", "x"), text_key("f", "plain", "x"));
        assert_ne!(text_key("e", "plain", "x"), text_key("e", "alpaca", "x"));
    }

    #[test]
    fn key_shape_check() {
        assert!(is_key(&"0".repeat(64)));
        assert!(!is_key(&"0".repeat(63)));
        assert!(!is_key(&"A".repeat(64)));
        assert!(!is_key(&"g".repeat(64)));
        assert!(!is_key("hello"));
    }

    #[test]
    fn meta_round_trips_through_json_and_keys_match() {
        let m = StoreMeta {
            embedder: "synthetic-latent/v1".into(),
            template: "plain".into(),
            dim: 32,
            synthetic: true,
        };
        let s = serde_json::to_string(&m).unwrap();
        let back: StoreMeta = serde_json::from_str(&s).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            m.key("q\no"),
            text_key("synthetic-latent/v1", "plain", "q\no")
        );
    }
}
