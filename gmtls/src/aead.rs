//! SM4-GCM TLS 1.3 record protection (RFC 8998 §3.1: AEAD_SM4_GCM, 16-byte key,
//! 12-byte nonce, 16-byte tag) and the TLS_SM4_GCM_SM3 suite definition.

use ferry_gm::{Sm4Gcm, TAG_LEN};
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::CipherSuiteCommon;
use rustls::{ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, Tls13CipherSuite};

use crate::hash::{HMAC_SM3, SM3};

/// SM4 key length.
pub const KEY_LEN: usize = 16;

/// The suite: SM3 transcript hash and HKDF, SM4-GCM records and QUIC packets.
pub static TLS13_SM4_GCM_SM3_SUITE: Tls13CipherSuite = Tls13CipherSuite {
    common: CipherSuiteCommon {
        suite: rustls::CipherSuite::Unknown(crate::TLS_SM4_GCM_SM3_ID),
        hash_provider: &SM3,
        // SM4 is a 128-bit block cipher like AES, so GCM's limits are AES-GCM's:
        // 2^24 full records keeps the distinguishing advantage below 2^-60.
        confidentiality_limit: 1 << 24,
    },
    hkdf_provider: &HkdfUsingHmac(&HMAC_SM3),
    aead_alg: &Sm4GcmAead,
    quic: Some(&crate::quic::SM4_GCM_QUIC),
};

/// The SM4-GCM record AEAD.
pub struct Sm4GcmAead;

/// A 16-byte SM4 key from rustls's key material (always `key_len()` long).
pub(crate) fn sm4_key(key: &AeadKey) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    let src = key.as_ref();
    // rustls sizes the key from `key_len()`; copying at most 16 bytes keeps a
    // malformed length from panicking (it would only yield a wrong key).
    let n = src.len().min(KEY_LEN);
    out[..n].copy_from_slice(&src[..n]);
    out
}

impl Tls13AeadAlgorithm for Sm4GcmAead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordCipher {
            gcm: Sm4Gcm::new(&sm4_key(&key)),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordCipher {
            gcm: Sm4Gcm::new(&sm4_key(&key)),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        KEY_LEN
    }

    fn extract_keys(
        &self,
        _key: AeadKey,
        _iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        // rustls's secret-extraction enum (for kTLS) has no SM4 variant.
        Err(UnsupportedOperationError)
    }
}

/// One direction of record protection: the key and the static IV that each
/// record's sequence number is XORed into (RFC 8446 §5.3).
struct RecordCipher {
    gcm: Sm4Gcm,
    iv: Iv,
}

impl MessageEncrypter for RecordCipher {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let nonce = Nonce::new(&self.iv, seq).0;
        let tag = self
            .gcm
            .seal_in_place(&nonce, &make_tls13_aad(total_len), payload.as_mut())
            .map_err(|_| Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        // TLS 1.3 records all carry the legacy version 0x0303 (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl MessageDecrypter for RecordCipher {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        let total_len = payload.len();
        let Some(body_len) = total_len.checked_sub(TAG_LEN) else {
            return Err(Error::DecryptError);
        };
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&payload[body_len..]);
        let nonce = Nonce::new(&self.iv, seq).0;
        self.gcm
            .open_in_place(
                &nonce,
                &make_tls13_aad(total_len),
                &mut payload[..body_len],
                &tag,
            )
            .map_err(|_| Error::DecryptError)?;
        payload.truncate(body_len);
        msg.into_tls13_unpadded_message()
    }
}
