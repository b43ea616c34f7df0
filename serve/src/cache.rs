//! A bounded least-recently-used map: the embedding cache (keyed as the embedding store is
//! keyed, `text_key(embedder, template, text)`) and the session table. Pure: recency is a
//! counter, not a clock.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// An LRU map holding at most `capacity` entries.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// An empty map; `capacity` 0 holds nothing.
    pub fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The value of `k`, marked as just used.
    pub fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let t = self.tick;
        let (v, used) = self.map.get_mut(k)?;
        self.order.remove(used);
        *used = t;
        self.order.insert(t, k.clone());
        Some(v.clone())
    }

    /// Inserts `k`, evicting the least recently used entry when full.
    pub fn insert(&mut self, k: K, v: V) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some((_, used)) = self.map.remove(&k) {
            self.order.remove(&used);
        }
        while self.map.len() >= self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&old);
        }
        self.order.insert(self.tick, k.clone());
        self.map.insert(k, (v, self.tick));
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = Lru::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        assert_eq!(c.get(&"a"), Some(1));
        c.insert("c", 3);
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"c"), Some(3));
        c.insert("a", 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"a"), Some(10));
        let mut z = Lru::new(0);
        z.insert("a", 1);
        assert!(z.is_empty());
    }
}
