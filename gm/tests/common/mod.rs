//! Helpers shared by the integration tests: the backends this CPU runs, and the
//! RustCrypto reference implementations.
#![allow(dead_code)]

use aes_gcm::aead::{AeadInOut, KeyInit};
use cipher::{BlockCipherEncrypt, KeyIvInit, StreamCipher};
use ferry_gm::Backend;

/// Every backend available here; the others are announced as skipped.
pub fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    for b in Backend::ALL {
        if b.is_available() {
            out.push(b);
        } else {
            eprintln!("SKIP: backend {} is not available on this CPU", b.name());
        }
    }
    out
}

pub fn hex16(s: &str) -> [u8; 16] {
    hex::decode(s)
        .expect("test hex")
        .try_into()
        .expect("16 bytes")
}

/// RustCrypto `sm4`, block by block.
pub fn rc_encrypt_blocks(key: &[u8; 16], blocks: &mut [[u8; 16]]) {
    let c = sm4::Sm4::new_from_slice(key).expect("16-byte key");
    for b in blocks {
        c.encrypt_block(b.into());
    }
}

/// RustCrypto `Ctr128BE<Sm4>`.
pub fn rc_ctr(key: &[u8; 16], iv: &[u8; 16], data: &mut [u8]) {
    let mut c = ctr::Ctr128BE::<sm4::Sm4>::new(key.into(), iv.into());
    c.apply_keystream(data);
}

/// RustCrypto `AesGcm<Sm4, U12>` (generic GCM over the table-based `sm4`).
pub type RcSm4Gcm = aes_gcm::AesGcm<sm4::Sm4, cipher::consts::U12>;

pub fn rc_gcm_seal(key: &[u8; 16], nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
    let c = RcSm4Gcm::new_from_slice(key).expect("16-byte key");
    let tag = c
        .encrypt_inout_detached(nonce.into(), aad, buf.into())
        .expect("seal");
    tag.into()
}
