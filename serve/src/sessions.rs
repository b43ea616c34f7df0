//! Group sessions: a group's embedded context stored under an id, so later requests send only
//! their targets and the context's vectors are computed once. Bounded: the least recently
//! used session is forgotten first.

use crate::cache::Lru;
use crate::forward::GroupContext;
use std::sync::{Arc, Mutex};

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<Lru<String, Arc<GroupContext>>>,
    next: Mutex<u64>,
    salt: u64,
}

impl Sessions {
    /// A table of at most `capacity` sessions; `salt` makes ids differ between processes.
    pub fn new(capacity: usize, salt: u64) -> Self {
        Sessions {
            table: Mutex::new(Lru::new(capacity)),
            next: Mutex::new(0),
            salt,
        }
    }

    /// Stores `ctx`, returning its id.
    pub fn create(&self, ctx: Arc<GroupContext>) -> String {
        let n = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let id = format!("g-{:016x}-{n}", self.salt);
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), ctx);
        id
    }

    /// The context stored under `id`.
    pub fn get(&self, id: &str) -> Option<Arc<GroupContext>> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.to_string())
    }
}
