//! `Sm4Gcm` through RustCrypto's generic `aead` traits gives the same bytes as
//! RustCrypto's own `AesGcm<Sm4, U12>` through the same traits.

mod common;

use aes_gcm::aead::{AeadInOut, KeyInit};
use common::RcSm4Gcm;
use ferry_gm::Sm4Gcm;
use proptest::prelude::*;

fn seal_generic<A: AeadInOut<NonceSize = cipher::consts::U12> + KeyInit>(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let a = A::new_from_slice(key).unwrap();
    let mut buf = data.to_vec();
    let nonce = aes_gcm::aead::Nonce::<A>::from(*nonce);
    let tag = a
        .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
        .unwrap();
    (buf, tag.to_vec())
}

proptest! {
    #[test]
    fn generic_aead_code_sees_the_same_gcm(
        key in any::<[u8; 16]>(),
        nonce in any::<[u8; 12]>(),
        aad in prop::collection::vec(any::<u8>(), 0..64),
        data in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let ours = seal_generic::<Sm4Gcm>(&key, &nonce, &aad, &data);
        let theirs = seal_generic::<RcSm4Gcm>(&key, &nonce, &aad, &data);
        prop_assert_eq!(&ours, &theirs);

        let gcm = Sm4Gcm::new_from_slice(&key).unwrap();
        let (mut buf, tag) = ours;
        let tag = tag.as_slice().try_into().unwrap();
        gcm.decrypt_inout_detached((&nonce).into(), &aad, buf.as_mut_slice().into(), tag).unwrap();
        prop_assert_eq!(&buf, &data);
        let mut bad = tag.to_owned();
        bad[0] ^= 1;
        prop_assert!(gcm.decrypt_inout_detached((&nonce).into(), &aad, buf.as_mut_slice().into(), &bad).is_err());
    }
}
