//! The view's local cache of objects already fetched and checked: a chunk's bytes or a
//! pack's uncompressed body, by object name, least recently used evicted first once
//! the bytes held pass the limit. In memory, or as files in a directory (for caches
//! larger than memory; the files are this process's own, trusted as the output of a
//! restore is, and removed when the view closes).
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;

struct Slot {
    tick: u64,
    len: u64,
    /// `None` when the bytes are in the cache directory.
    data: Option<Bytes>,
}

pub struct Cache {
    limit: u64,
    used: u64,
    tick: u64,
    slots: HashMap<String, Slot>,
    /// tick → name: the least recently used first.
    order: BTreeMap<u64, String>,
    dir: Option<PathBuf>,
}

impl Cache {
    /// A cache of at most `limit` bytes, in `dir` when given (created if missing).
    pub fn new(limit: u64, dir: Option<PathBuf>) -> std::io::Result<Cache> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(Cache {
            limit,
            used: 0,
            tick: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            dir,
        })
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    fn file(&self, name: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(name.replace('/', "_")))
    }

    /// Bytes `[at, at + len)` of `name` if cached (and marks it used); `None` on a miss
    /// (a cache file that cannot be read counts as one: the object is fetched again).
    pub fn get(&mut self, name: &str, at: u64, len: u64) -> Option<Bytes> {
        let file = self.file(name);
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(name)?;
        if at.checked_add(len)? > slot.len {
            return None;
        }
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, name.to_string());
        match (&slot.data, file) {
            (Some(b), _) => Some(b.slice(at as usize..(at + len) as usize)),
            (None, Some(path)) => {
                let mut buf = vec![0u8; len as usize];
                File::open(path).ok()?.read_exact_at(&mut buf, at).ok()?;
                Some(Bytes::from(buf))
            }
            (None, None) => None,
        }
    }

    /// Keeps `data` as `name`, evicting the least recently used until it fits; an
    /// object larger than the whole cache is not kept.
    pub fn put(&mut self, name: &str, data: Bytes) {
        let len = data.len() as u64;
        if len > self.limit || self.slots.contains_key(name) {
            return;
        }
        while self.used + len > self.limit {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.evict(&victim);
        }
        let data = match self.file(name) {
            Some(path) => match std::fs::write(&path, &data) {
                Ok(()) => None,
                // A full or broken cache disk only costs refetches.
                Err(_) => return,
            },
            None => Some(data),
        };
        self.tick += 1;
        self.order.insert(self.tick, name.to_string());
        self.slots.insert(
            name.to_string(),
            Slot {
                tick: self.tick,
                len,
                data,
            },
        );
        self.used += len;
    }

    fn evict(&mut self, name: &str) {
        if let Some(s) = self.slots.remove(name) {
            self.used -= s.len;
            if let Some(path) = self.file(name) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for n in names {
            self.evict(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    fn lru_by_bytes(dir: Option<PathBuf>) {
        let mut c = Cache::new(300, dir).unwrap();
        c.put("packs/a", filled(1, 100));
        c.put("chunks/b", filled(2, 100));
        c.put("c", filled(3, 100));
        assert_eq!(c.get("packs/a", 10, 5).as_deref(), Some(&[1u8; 5][..]));
        c.put("d", filled(4, 150)); // evicts b and c, not the recently read a
        assert!(c.get("chunks/b", 0, 1).is_none() && c.get("c", 0, 1).is_none());
        assert_eq!(c.get("d", 149, 1).as_deref(), Some(&[4u8][..]));
        assert_eq!(c.get("packs/a", 0, 100).map(|b| b.len()), Some(100));
        assert!(c.get("packs/a", 90, 20).is_none(), "past the object's end");
        assert_eq!(c.used(), 250);
        c.put("huge", filled(5, 301));
        assert!(c.get("huge", 0, 1).is_none(), "larger than the cache");
        assert_eq!(c.used(), 250);
    }

    #[test]
    fn memory_cache_evicts_least_recently_used_by_bytes() {
        lru_by_bytes(None);
    }

    #[test]
    fn directory_cache_evicts_and_removes_its_files() {
        let d = tempfile::tempdir().unwrap();
        lru_by_bytes(Some(d.path().join("c")));
        assert_eq!(std::fs::read_dir(d.path().join("c")).unwrap().count(), 0);
    }
}
