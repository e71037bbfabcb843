//! Every backend against RustCrypto (`sm4`, `Ctr128BE<Sm4>`, `AesGcm<Sm4, U12>`) and so
//! against each other, on random keys and lengths that are not multiples of the
//! backends' parallel widths (16 to 64 blocks) nor, for CTR and GCM, of 16 bytes.

mod common;

use common::{backends, rc_ctr, rc_encrypt_blocks, rc_gcm_seal};
use ferry_gm::{Sm4, Sm4Ctr, Sm4Gcm};
use proptest::prelude::*;

proptest! {
    #[test]
    fn blocks_match_rustcrypto(
        key in any::<[u8; 16]>(),
        blocks in prop::collection::vec(any::<[u8; 16]>(), 0..200),
    ) {
        let mut expected = blocks.clone();
        rc_encrypt_blocks(&key, &mut expected);
        for backend in backends() {
            let sm4 = Sm4::with_backend(&key, backend).unwrap();
            let mut got = blocks.clone();
            sm4.encrypt_blocks(&mut got);
            prop_assert_eq!(&got, &expected, "{:?}", backend);
            sm4.decrypt_blocks(&mut got);
            prop_assert_eq!(&got, &blocks, "{:?}", backend);
        }
    }

    #[test]
    fn ctr_matches_rustcrypto_in_any_pieces(
        key in any::<[u8; 16]>(),
        // Counters near the 128-bit wrap and a 32-bit carry inside a batch, as well
        // as anywhere.
        iv in prop_oneof![
            any::<[u8; 16]>(),
            Just([0xff; 16]),
            Just([0xfe; 16]),
            Just([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 0xff, 0xff, 0xff, 0xf0]),
        ],
        data in prop::collection::vec(any::<u8>(), 0..3000),
        cuts in prop::collection::vec(0usize..3000, 0..4),
    ) {
        let mut expected = data.clone();
        rc_ctr(&key, &iv, &mut expected);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        for backend in backends() {
            let mut ctr = Sm4Ctr::with_backend(&key, &iv, backend).unwrap();
            let mut got = data.clone();
            let mut at = 0;
            for &cut in cuts.iter().chain([data.len()].iter()) {
                ctr.apply_keystream(&mut got[at..cut]);
                at = cut;
            }
            prop_assert_eq!(&got, &expected, "{:?} cuts {:?}", backend, cuts);
        }
    }

    #[test]
    fn gcm_matches_rustcrypto(
        key in any::<[u8; 16]>(),
        nonce in any::<[u8; 12]>(),
        aad in prop::collection::vec(any::<u8>(), 0..300),
        data in prop::collection::vec(any::<u8>(), 0..5000),
    ) {
        let mut expected = data.clone();
        let expected_tag = rc_gcm_seal(&key, &nonce, &aad, &mut expected);
        for backend in backends() {
            let gcm = Sm4Gcm::with_backend(&key, backend).unwrap();
            let mut got = data.clone();
            let tag = gcm.seal_in_place(&nonce, &aad, &mut got).unwrap();
            prop_assert_eq!(&got, &expected, "{:?}", backend);
            prop_assert_eq!(tag, expected_tag, "{:?}", backend);
            gcm.open_in_place(&nonce, &aad, &mut got, &tag).unwrap();
            prop_assert_eq!(&got, &data, "{:?}", backend);
        }
    }
}
