//! SM3 for rustls: the transcript hash ([`Sm3Hash`]) and HMAC-SM3 ([`Sm3Hmac`]), from
//! which rustls's `HkdfUsingHmac` builds the TLS 1.3 key schedule (RFC 8998 §3.1:
//! HKDF with SM3 as the hash).

use ferry_gm::{Digest, Sm3};
use hmac::{Hmac, KeyInit, Mac};
use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::{hash, hmac as rhmac};

/// Output length of SM3 in bytes.
pub const SM3_LEN: usize = 32;

/// SM3 has no code in the TLS HashAlgorithm registry (RFC 8998 only defines TLS 1.3
/// code points). rustls compares this value only to match suites for resumption, so
/// a private-use value keeps SM3 distinct from every SHA-2.
pub const SM3_HASH_ALGORITHM: HashAlgorithm = HashAlgorithm::Unknown(0xe0);

/// SM3 as rustls's transcript hash.
#[derive(Debug)]
pub struct Sm3Hash;

/// The one instance the suite points at.
pub static SM3: Sm3Hash = Sm3Hash;

impl hash::Hash for Sm3Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(Sm3::new()))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(&Sm3::digest(data))
    }

    fn output_len(&self) -> usize {
        SM3_LEN
    }

    fn algorithm(&self) -> HashAlgorithm {
        SM3_HASH_ALGORITHM
    }
}

struct Sm3Context(Sm3);

impl hash::Context for Sm3Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(&self.0.clone().finalize())
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(&self.0.finalize())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
}

/// HMAC-SM3 (RFC 2104 over SM3, block size 64), RustCrypto's generic HMAC.
#[derive(Debug)]
pub struct Sm3Hmac;

/// The one instance the key schedule uses.
pub static HMAC_SM3: Sm3Hmac = Sm3Hmac;

impl rhmac::Hmac for Sm3Hmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn rhmac::Key> {
        Box::new(Sm3HmacKey(hmac_sm3(key)))
    }

    fn hash_output_len(&self) -> usize {
        SM3_LEN
    }
}

/// A keyed HMAC-SM3 state; HMAC takes keys of any length, so this cannot fail.
fn hmac_sm3(key: &[u8]) -> Hmac<Sm3> {
    match Hmac::<Sm3>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

struct Sm3HmacKey(Hmac<Sm3>);

impl rhmac::Key for Sm3HmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rhmac::Tag {
        let mut mac = self.0.clone();
        mac.update(first);
        for m in middle {
            mac.update(m);
        }
        mac.update(last);
        rhmac::Tag::new(&mac.finalize().into_bytes())
    }

    fn tag_len(&self) -> usize {
        SM3_LEN
    }
}

/// HMAC-SM3 of `data` under `key` (for tests and other callers).
pub fn hmac_sm3_tag(key: &[u8], data: &[u8]) -> [u8; SM3_LEN] {
    let mut mac = hmac_sm3(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}
