//! A generational slot arena: the SGS's workers and in-flight requests live
//! in one each. A key is (slot, generation); a slot freed and reused gets a
//! new generation, so a stale key (a late completion, a request answered and
//! forgotten) finds nothing instead of someone else's entry.

/// (slot, generation).
pub(super) type Key = (u32, u32);

pub(super) struct Slots<T> {
    items: Vec<Option<(u32, T)>>,
    free: Vec<u32>,
    gen: u32,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self { items: Vec::new(), free: Vec::new(), gen: 0, len: 0 }
    }
}

impl<T> Slots<T> {
    /// Stores `value` in a free slot (or a new one) under a fresh generation.
    pub fn insert(&mut self, value: T) -> Key {
        self.gen = self.gen.wrapping_add(1);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.items.push(None);
                (self.items.len() - 1) as u32
            }
        };
        self.items[slot as usize] = Some((self.gen, value));
        self.len += 1;
        (slot, self.gen)
    }

    /// The entry under `key`, if it is still the one that key named.
    pub fn get(&self, key: Key) -> Option<&T> {
        self.items.get(key.0 as usize)?.as_ref().filter(|(g, _)| *g == key.1).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        self.items.get_mut(key.0 as usize)?.as_mut().filter(|(g, _)| *g == key.1).map(|(_, v)| v)
    }

    /// Whatever occupies `slot` now, with its generation.
    pub fn at_mut(&mut self, slot: u32) -> Option<(u32, &mut T)> {
        self.items.get_mut(slot as usize)?.as_mut().map(|(g, v)| (*g, v))
    }

    /// Takes the entry under `key` out (its slot is free again).
    pub fn remove(&mut self, key: Key) -> Option<T> {
        self.get(key)?;
        self.remove_at(key.0).map(|(_, v)| v)
    }

    /// Takes whatever occupies `slot` out, with its generation.
    pub fn remove_at(&mut self, slot: u32) -> Option<(u32, T)> {
        let taken = self.items.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(taken)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every live entry with its key, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.items.iter().enumerate().filter_map(|(s, e)| e.as_ref().map(|(g, v)| ((s as u32, *g), v)))
    }

    /// The slots in use (some may be freed by the caller while it walks them).
    pub fn slots(&self) -> Vec<u32> {
        self.iter().map(|((s, _), _)| s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_key_finds_nothing_after_its_slot_is_reused() {
        let mut s = Slots::default();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(a.0, b.0, "the freed slot is reused");
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.iter().count(), 1);
        assert_eq!(s.at_mut(b.0).map(|(g, v)| (g, *v)), Some((b.1, "b")));
        assert_eq!(s.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(), vec![(b, "b")]);
        assert_eq!(s.remove_at(b.0), Some((b.1, "b")));
        assert!(s.is_empty());
    }
}
