//! Known-answer tests for the pieces the provider adds on top of ferry-gm's
//! primitives. Expected values come from elsewhere, never from this crate:
//!
//! * SM4-GCM: RFC 8998 appendix A.1, run through the QUIC packet key.
//! * HMAC-SM3 and HKDF-SM3: computed with OpenSSL 3.0.19 (`openssl mac -digest SM3
//!   … HMAC`, `openssl kdf -kdfopt digest:SM3 … HKDF`) on the inputs of RFC 4231
//!   test cases 2, 3 and 6 and RFC 5869 test cases 1 and 3.
//! * QUIC keys and header protection: RFC 9001 appendix A's connection ID, salt and
//!   packet run through this suite (SM3, SM4) instead of AES; the expected key, IV,
//!   HP key and mask from OpenSSL 3.0.19 (`openssl kdf … mode:EXTRACT_ONLY` /
//!   `mode:EXPAND_ONLY` with the HKDF-Expand-Label info bytes, `openssl enc
//!   -sm4-ecb`), the packet ciphertext from Python `cryptography` 48 (OpenSSL's
//!   SM4-GCM).
//! * The SM4 block: GB/T 32907's example, as the header protection mask.

use ferry_gm::Sm4;
use ferry_gmtls::aead::TLS13_SM4_GCM_SM3_SUITE;
use ferry_gmtls::hash::{hmac_sm3_tag, HMAC_SM3, SM3};
use ferry_gmtls::quic::{header_mask, SM4_GCM_QUIC};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::crypto::hash::Hash;
use rustls::crypto::tls13::{Hkdf, HkdfUsingHmac};
use rustls::quic::{Algorithm, Suite, Version};
use rustls::Side;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector hex")
}

#[test]
fn hmac_sm3_matches_openssl() {
    let cases: [(Vec<u8>, &[u8], &str); 3] = [
        (
            vec![0x0b; 20],
            b"Hi There",
            "51b00d1fb49832bfb01c3ce27848e59f871d9ba938dc563b338ca964755cce70",
        ),
        (
            b"Jefe".to_vec(),
            b"what do ya want for nothing?",
            "2e87f1d16862e6d964b50a5200bf2b10b764faa9680a296a2405f24bec39f882",
        ),
        // A key longer than SM3's 64-byte block is hashed first.
        (
            vec![0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            "b4fd844e13342002f0b2e0690ea7741f1497d993a70494cea601e657bedf67a0",
        ),
    ];
    for (key, data, expected) in cases {
        assert_eq!(hmac_sm3_tag(&key, data).to_vec(), unhex(expected));
        // The same through rustls's HMAC trait, split as the key schedule splits.
        let tag = rustls::crypto::hmac::Hmac::with_key(&HMAC_SM3, &key).sign_concat(
            &data[..1],
            &[&data[1..3]],
            &data[3..],
        );
        assert_eq!(tag.as_ref(), &unhex(expected)[..]);
    }
}

#[test]
fn sm3_transcript_hash_matches_gbt_32905() {
    // GB/T 32905 appendix A, example 1, incrementally and forked.
    let expected = unhex("66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0");
    assert_eq!(SM3.hash(b"abc").as_ref(), &expected[..]);
    let mut ctx = SM3.start();
    ctx.update(b"a");
    let fork = ctx.fork();
    ctx.update(b"bc");
    assert_eq!(ctx.fork_finish().as_ref(), &expected[..]);
    assert_eq!(ctx.finish().as_ref(), &expected[..]);
    assert_eq!(fork.finish().as_ref(), SM3.hash(b"a").as_ref());
}

#[test]
fn hkdf_sm3_matches_openssl() {
    let hkdf = HkdfUsingHmac(&HMAC_SM3);
    let ikm = [0x0b; 22];
    // RFC 5869 test case 1 inputs.
    let salt = unhex("000102030405060708090a0b0c");
    let info = unhex("f0f1f2f3f4f5f6f7f8f9");
    let mut okm = [0u8; 42];
    hkdf.extract_from_secret(Some(&salt), &ikm)
        .expand_slice(&[&info[..5], &info[5..]], &mut okm)
        .unwrap();
    assert_eq!(
        okm.to_vec(),
        unhex(
            "c69fe91b7aaee2dd5718d72dcaee0cce93f1b8e41f792da51261b6a517e68b36ed2c595572b01dfa359b"
        )
    );
    // RFC 5869 test case 3 inputs: no salt (HashLen zeros), no info.
    hkdf.extract_from_secret(None, &ikm)
        .expand_slice(&[], &mut okm)
        .unwrap();
    assert_eq!(
        okm.to_vec(),
        unhex(
            "c8c91a38ae2fb3b023a7c38ce9f0748f28230d59b6b950ba3ba949bf0d713a5774815778801741cb2034"
        )
    );
}

/// RFC 8998 appendix A.1 through the QUIC packet key: with packet number 0 the
/// nonce is the IV itself, and the packet header is the AAD.
#[test]
fn quic_packet_key_matches_rfc8998_sm4_gcm_vector() {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&unhex("0123456789abcdeffedcba9876543210"));
    let iv = Iv::from(<[u8; 12]>::try_from(unhex("00001234567800000000abcd")).unwrap());
    let packet = SM4_GCM_QUIC.packet_key(AeadKey::from(key), iv);
    let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
    let plain = unhex(
        "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd\
         eeeeeeeeeeeeeeeeffffffffffffffffeeeeeeeeeeeeeeeeaaaaaaaaaaaaaaaa",
    );
    let mut buf = plain.clone();
    let tag = packet.encrypt_in_place(0, &aad, &mut buf).unwrap();
    assert_eq!(
        buf,
        unhex(
            "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735\
             d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d"
        )
    );
    assert_eq!(tag.as_ref(), &unhex("83de3541e4c2b58177e065a9bf7b62ec")[..]);
    buf.extend_from_slice(tag.as_ref());
    assert_eq!(
        packet.decrypt_in_place(0, &aad, &mut buf).unwrap(),
        &plain[..]
    );
    // A flipped AAD bit is refused.
    let mut bad = aad.clone();
    bad[0] ^= 1;
    let mut buf2 = unhex(
        "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735\
         d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d\
         83de3541e4c2b58177e065a9bf7b62ec",
    );
    assert!(packet.decrypt_in_place(0, &bad, &mut buf2).is_err());
}

/// RFC 9001 appendix A's client Initial (DCID, v1 salt, header, packet number 2,
/// CRYPTO frame prefix), protected with this suite's key schedule instead of
/// AES/SHA-256: key, IV and HP key derivation through HKDF-SM3 with the "quic key",
/// "quic iv" and "quic hp" labels, SM4-GCM payload, SM4-ECB header mask.
#[test]
fn quic_keys_and_header_protection_match_openssl() {
    let suite = Suite {
        suite: &TLS13_SM4_GCM_SM3_SUITE,
        quic: &SM4_GCM_QUIC,
    };
    let keys = suite.keys(&unhex("8394c8f03e515708"), Side::Client, Version::V1);
    let header = unhex("c300000001088394c8f03e5157080000449e00000002");
    let mut payload = unhex(
        "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868\
         04fe3a47f06a2b69484c00000413011302",
    );
    let tag = keys
        .local
        .packet
        .encrypt_in_place(2, &header, &mut payload)
        .unwrap();
    assert_eq!(
        payload,
        unhex(
            "2b173c3ef81e7a85dce34adfa2c38282034a86cb122e1b8ed029f9afbeef90d3\
             f6dd897501d5aaeb8b4875633f0e02191f"
        )
    );
    assert_eq!(tag.as_ref(), &unhex("0d5734eb66a444715f26b7b5bd90cd70")[..]);

    // OpenSSL: hp = 78c57aad9fe78414c6e9006aa597a4a8, SM4-ECB(hp, sample) =
    // 5745166b9dfa568a5698ea744453c3a8. Long header: low 4 bits of the first byte.
    let sample = unhex("d1b1c98dd7689fb8ec11d242b123dc9b");
    let hp = Sm4::new(
        &unhex("78c57aad9fe78414c6e9006aa597a4a8")
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        header_mask(&hp, &sample).unwrap().to_vec(),
        unhex("5745166b9dfa568a5698ea744453c3a8")
    );
    let (mut first, mut pn) = (0xc3u8, [0x00, 0x00, 0x00, 0x02]);
    keys.local
        .header
        .encrypt_in_place(&sample, &mut first, &mut pn)
        .unwrap();
    assert_eq!(first, 0xc3 ^ (0x57 & 0x0f));
    assert_eq!(pn, [0x45, 0x16, 0x6b, 0x9d ^ 0x02]);
    // The server side derives the same client keys to remove the protection.
    let server = suite.keys(&unhex("8394c8f03e515708"), Side::Server, Version::V1);
    server
        .remote
        .header
        .decrypt_in_place(&sample, &mut first, &mut pn)
        .unwrap();
    assert_eq!((first, pn), (0xc3, [0, 0, 0, 2]));
    assert!(keys
        .local
        .header
        .encrypt_in_place(&sample[..15], &mut first, &mut pn)
        .is_err());
}

/// GB/T 32907's example (key = plaintext = 0123…3210) as a header mask, applied to
/// a short header: the low 5 bits of the first byte and a 2-byte packet number.
#[test]
fn short_header_mask_uses_sm4_block() {
    let k = unhex("0123456789abcdeffedcba9876543210");
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&k);
    let hp = SM4_GCM_QUIC.header_protection_key(AeadKey::from(key));
    assert_eq!(hp.sample_len(), 16);
    let (mut first, mut pn) = (0x41u8, [0x00, 0x07, 0xee]);
    hp.encrypt_in_place(&k, &mut first, &mut pn).unwrap();
    // mask = 681edf34…: 0x68 & 0x1f = 0x08; only pn_len = 2 bytes are masked.
    assert_eq!(first, 0x41 ^ 0x08);
    assert_eq!(pn, [0x1e, 0x07 ^ 0xdf, 0xee]);
}
