//! SM4-GCM refuses any change to ciphertext, AAD, tag or nonce, on every backend, and
//! leaves a refused buffer as it was.

mod common;

use common::backends;
use ferry_gm::{Error, Sm4Gcm};
use proptest::prelude::*;

struct Sealed {
    nonce: [u8; 12],
    aad: Vec<u8>,
    ct: Vec<u8>,
    tag: [u8; 16],
}

fn seal(gcm: &Sm4Gcm, aad_len: usize, len: usize) -> Sealed {
    let nonce = [0x5a; 12];
    let aad: Vec<u8> = (0..aad_len).map(|i| i as u8).collect();
    let mut ct: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let tag = gcm.seal_in_place(&nonce, &aad, &mut ct).unwrap();
    Sealed {
        nonce,
        aad,
        ct,
        tag,
    }
}

fn refused(gcm: &Sm4Gcm, s: &Sealed) -> bool {
    let mut buf = s.ct.clone();
    let r = gcm.open_in_place(&s.nonce, &s.aad, &mut buf, &s.tag);
    assert_eq!(
        buf, s.ct,
        "a refused (or accepted) open changed the buffer before success"
    );
    r == Err(Error::Authentication)
}

/// Every byte of ciphertext, AAD, tag and nonce, flipped in turn.
#[test]
fn flipping_any_byte_is_refused() {
    for backend in backends() {
        let gcm = Sm4Gcm::with_backend(&[9; 16], backend).unwrap();
        let good = seal(&gcm, 37, 300);
        let mut ok = good.ct.clone();
        gcm.open_in_place(&good.nonce, &good.aad, &mut ok, &good.tag)
            .unwrap();
        for i in 0..good.ct.len() {
            let mut s = seal(&gcm, 37, 300);
            s.ct[i] ^= 0x01;
            assert!(refused(&gcm, &s), "{backend:?}: ct byte {i}");
        }
        for i in 0..good.aad.len() {
            let mut s = seal(&gcm, 37, 300);
            s.aad[i] ^= 0x80;
            assert!(refused(&gcm, &s), "{backend:?}: aad byte {i}");
        }
        for i in 0..16 {
            let mut s = seal(&gcm, 37, 300);
            s.tag[i] ^= 0x10;
            assert!(refused(&gcm, &s), "{backend:?}: tag byte {i}");
        }
        for i in 0..12 {
            let mut s = seal(&gcm, 37, 300);
            s.nonce[i] ^= 0x04;
            assert!(refused(&gcm, &s), "{backend:?}: nonce byte {i}");
        }
    }
}

/// Dropping or adding a byte changes the lengths block: refused too.
#[test]
fn truncation_and_extension_are_refused() {
    for backend in backends() {
        let gcm = Sm4Gcm::with_backend(&[3; 16], backend).unwrap();
        let mut s = seal(&gcm, 16, 64);
        s.ct.pop();
        assert!(refused(&gcm, &s), "{backend:?}: truncated ct");
        let mut s = seal(&gcm, 16, 64);
        s.ct.push(0);
        assert!(refused(&gcm, &s), "{backend:?}: extended ct");
        let mut s = seal(&gcm, 16, 64);
        s.aad.push(0);
        assert!(refused(&gcm, &s), "{backend:?}: extended aad");
    }
}

proptest! {
    #[test]
    fn any_xor_anywhere_is_refused(
        key in any::<[u8; 16]>(),
        // Both sides of 4 KiB: short messages take E(J0) from the keystream pass.
        len in prop_oneof![0usize..2000, 4090usize..6000],
        aad_len in 0usize..100,
        target in 0usize..3,
        pos in any::<usize>(),
        mask in 1u8..=255,
    ) {
        for backend in backends() {
            let gcm = Sm4Gcm::with_backend(&key, backend).unwrap();
            let mut s = seal(&gcm, aad_len, len);
            match target {
                0 if len > 0 => s.ct[pos % len] ^= mask,
                1 if aad_len > 0 => s.aad[pos % aad_len] ^= mask,
                _ => s.tag[pos % 16] ^= mask,
            }
            prop_assert!(refused(&gcm, &s), "{:?}", backend);
        }
    }
}
