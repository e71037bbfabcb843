//! Known-answer tests: GB/T 32907's SM4 examples and SM4-GCM vectors from RFC 8998
//! (appendix A.1) and Wycheproof, on every backend this CPU has.

mod common;

use common::{backends, hex16};
use ferry_gm::{Error, Sm4, Sm4Gcm};

const KEY: &str = "0123456789abcdeffedcba9876543210";

#[test]
fn sm4_example_1_encrypts_and_decrypts() {
    let key = hex16(KEY);
    for backend in backends() {
        let sm4 = Sm4::with_backend(&key, backend).unwrap();
        let mut block = key;
        sm4.encrypt_block(&mut block);
        assert_eq!(
            hex::encode(block),
            "681edf34d206965e86b3e94f536e4246",
            "{backend:?}"
        );
        sm4.decrypt_block(&mut block);
        assert_eq!(block, key, "{backend:?}");
    }
}

/// Example 2: the plaintext encrypted 1,000,000 times under the same key.
#[test]
fn sm4_example_2_million_iterations() {
    let key = hex16(KEY);
    for backend in backends() {
        let sm4 = Sm4::with_backend(&key, backend).unwrap();
        let started = std::time::Instant::now();
        let mut block = key;
        for _ in 0..1_000_000 {
            sm4.encrypt_block(&mut block);
        }
        eprintln!(
            "{}: 1,000,000 single-block encryptions in {:?}",
            backend.name(),
            started.elapsed()
        );
        assert_eq!(
            hex::encode(block),
            "595298c7c6fd271f0402f804c33d3f66",
            "{backend:?}"
        );
    }
}

/// Many blocks at once exercise the wide paths and the padded tails: example 1 in
/// every position of batches of every length up to 130 blocks.
#[test]
fn sm4_example_1_in_every_batch_position() {
    let key = hex16(KEY);
    let expected = hex16("681edf34d206965e86b3e94f536e4246");
    for backend in backends() {
        let sm4 = Sm4::with_backend(&key, backend).unwrap();
        for n in 1..=130 {
            let mut blocks = vec![key; n];
            sm4.encrypt_blocks(&mut blocks);
            assert!(blocks.iter().all(|b| *b == expected), "{backend:?} n={n}");
            sm4.decrypt_blocks(&mut blocks);
            assert!(blocks.iter().all(|b| *b == key), "{backend:?} n={n}");
        }
    }
}

struct GcmVector {
    key: &'static str,
    nonce: &'static str,
    aad: &'static str,
    pt: &'static str,
    ct: &'static str,
    tag: &'static str,
}

const GCM_VECTORS: [GcmVector; 2] = [
    // RFC 8998 A.1 (also GB/T 36624 C.5).
    GcmVector {
        key: KEY,
        nonce: "00001234567800000000abcd",
        aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        pt: "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd\
             eeeeeeeeeeeeeeeeffffffffffffffffeeeeeeeeeeeeeeeeaaaaaaaaaaaaaaaa",
        ct: "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735\
             d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d",
        tag: "83de3541e4c2b58177e065a9bf7b62ec",
    },
    // Wycheproof SM4-GCM tc 2: empty message and AAD.
    GcmVector {
        key: "bedcfb5a011ebc84600fcb296c15af0d",
        nonce: "438a547a94ea88dce46c6c85",
        aad: "",
        pt: "",
        ct: "",
        tag: "a486a45596cb92cf529de2038583707d",
    },
];

#[test]
fn gcm_vectors_seal_and_open() {
    for v in &GCM_VECTORS {
        let key = hex16(v.key);
        let nonce: [u8; 12] = hex::decode(v.nonce).unwrap().try_into().unwrap();
        let aad = hex::decode(v.aad).unwrap();
        for backend in backends() {
            let gcm = Sm4Gcm::with_backend(&key, backend).unwrap();
            let mut buf = hex::decode(v.pt).unwrap();
            let tag = gcm.seal_in_place(&nonce, &aad, &mut buf).unwrap();
            assert_eq!(hex::encode(&buf), v.ct, "{backend:?}");
            assert_eq!(hex::encode(tag), v.tag, "{backend:?}");
            gcm.open_in_place(&nonce, &aad, &mut buf, &tag).unwrap();
            assert_eq!(hex::encode(&buf), v.pt, "{backend:?}");
        }
    }
}

#[test]
fn gcm_refuses_a_wrong_tag_and_leaves_the_buffer() {
    let v = &GCM_VECTORS[0];
    let key = hex16(v.key);
    let nonce: [u8; 12] = hex::decode(v.nonce).unwrap().try_into().unwrap();
    let aad = hex::decode(v.aad).unwrap();
    for backend in backends() {
        let gcm = Sm4Gcm::with_backend(&key, backend).unwrap();
        let mut buf = hex::decode(v.ct).unwrap();
        let mut tag = hex16(v.tag);
        tag[15] ^= 1;
        assert_eq!(
            gcm.open_in_place(&nonce, &aad, &mut buf, &tag),
            Err(Error::Authentication)
        );
        assert_eq!(
            hex::encode(&buf),
            v.ct,
            "{backend:?}: refused ciphertext was changed"
        );
    }
}
