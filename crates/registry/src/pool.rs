//! What the registry client keeps between requests and builds: one
//! oci-client and one HTTP client per registry (their connection pools and
//! auth tokens), pull tokens, and images resolved by digest (immutable).
//! Everything is keyed by the credentials too, so one user's token or
//! resolution never serves another's request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_digest::Digest;

use crate::{Credentials, ResolvedImage};

/// A pull token is reused this long (registries issue them for minutes;
/// a refused request drops it sooner).
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(50);
/// Entries each cache may hold before it is emptied (a bound, not an LRU:
/// a daemon talks to a handful of registries and bases).
const MAX_ENTRIES: usize = 256;

/// Which credentials a request carries, as a key (a digest: the password
/// itself is not kept as a key).
pub(crate) fn creds_key(creds: Option<&Credentials>) -> String {
    match creds {
        Some(c) if !c.username.is_empty() => {
            Digest::of(format!("{}\0{}", c.username, c.password).as_bytes()).to_string()
        }
        _ => String::new(),
    }
}

/// A map that is emptied when it reaches its bound.
pub(crate) struct Bounded<K, V>(Mutex<HashMap<K, V>>);

impl<K: std::hash::Hash + Eq, V: Clone> Bounded<K, V> {
    pub(crate) fn get(&self, k: &K) -> Option<V> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(k)
            .cloned()
    }

    pub(crate) fn insert(&self, k: K, v: V) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        m.insert(k, v);
    }

    pub(crate) fn remove(&self, k: &K) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(k);
    }

    /// The value for `k`, made by `make` when absent.
    pub(crate) fn get_or_insert_with(&self, k: K, make: impl FnOnce() -> V) -> V {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get(&k) {
            return v.clone();
        }
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        let v = make();
        m.insert(k, v.clone());
        v
    }
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Bounded(Mutex::new(HashMap::new()))
    }
}

/// (registry host, plain HTTP, credentials key)
pub(crate) type ClientKey = (String, bool, String);
/// (registry host, repository, credentials key)
pub(crate) type TokenKey = (String, String, String);
/// (registry/repository@digest, os/arch/variant, credentials key)
pub(crate) type ResolvedKey = (String, String, String);

#[derive(Default)]
pub(crate) struct Pool {
    pub clients: Bounded<ClientKey, oci_client::Client>,
    pub http: Bounded<String, reqwest::Client>,
    /// The bearer token for pulls (None: the registry asks for none).
    pub tokens: Bounded<TokenKey, (Option<String>, Instant)>,
    pub resolved: Bounded<ResolvedKey, ResolvedImage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_keys_apart_and_bounds_hold() {
        let a = Credentials {
            username: "a".into(),
            password: "x".into(),
        };
        let b = Credentials {
            username: "a".into(),
            password: "y".into(),
        };
        assert_ne!(creds_key(Some(&a)), creds_key(Some(&b)));
        assert_eq!(creds_key(None), "");
        assert!(!creds_key(Some(&a)).contains('x'));
        let m: Bounded<u32, u32> = Bounded::default();
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            m.insert(i, i);
        }
        assert!(m.0.lock().unwrap().len() <= MAX_ENTRIES);
        assert_eq!(m.get_or_insert_with(7_000, || 1), 1);
        assert_eq!(m.get_or_insert_with(7_000, || 2), 1);
    }
}
