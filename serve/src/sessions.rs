//! Group sessions: a group's embedded context stored under an id, so later requests send only
//! their targets and the context's vectors are computed once. Bounded: the least recently
//! used session is forgotten first. Ids are 128 random bits from the operating system, so
//! one client cannot guess (and read or use) another's session.

use crate::cache::Lru;
use crate::forward::GroupContext;
use std::sync::{Arc, Mutex};

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<Lru<String, Arc<GroupContext>>>,
}

impl Sessions {
    /// A table of at most `capacity` sessions.
    pub fn new(capacity: usize) -> Self {
        Sessions {
            table: Mutex::new(Lru::new(capacity)),
        }
    }

    /// Stores `ctx`, returning its id (`g-` and 32 hex digits), or the random source's error.
    pub fn create(&self, ctx: Arc<GroupContext>) -> anyhow::Result<String> {
        let id = format!("g-{}", gpo_ops::auth::random_hex(16)?);
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), ctx);
        Ok(id)
    }

    /// The context stored under `id`.
    pub fn get(&self, id: &str) -> Option<Arc<GroupContext>> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.to_string())
    }
}
