//! QUIC packet protection for TLS_SM4_GCM_SM3 (RFC 9001 §5 with SM4 in place of
//! AES): SM4-GCM packet keys whose nonce is the IV XOR the packet number, and
//! header protection whose mask is SM4-ECB of the 16-byte ciphertext sample
//! (RFC 9001 §5.4.3's AES-based scheme; RFC 8998 registers SM4-GCM for TLS 1.3,
//! and QUIC derives its keys from the suite's HKDF with the "quic key", "quic iv"
//! and "quic hp" labels, so SM3 is used there too).

use ferry_gm::{Sm4, Sm4Gcm, TAG_LEN};
use rustls::crypto::cipher::{AeadKey, Iv, Nonce};
use rustls::quic::{self, Algorithm, HeaderProtectionKey, PacketKey, Tag};
use rustls::Error;

use crate::aead::{sm4_key, KEY_LEN};

/// Bytes of ciphertext sampled for the header protection mask (one SM4 block).
pub const SAMPLE_LEN: usize = 16;

/// The QUIC algorithm of TLS_SM4_GCM_SM3.
pub struct Sm4GcmQuic;

/// The one instance the suite points at.
pub static SM4_GCM_QUIC: Sm4GcmQuic = Sm4GcmQuic;

impl Algorithm for Sm4GcmQuic {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn PacketKey> {
        Box::new(Sm4GcmPacketKey {
            gcm: Sm4Gcm::new(&sm4_key(&key)),
            iv,
        })
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn HeaderProtectionKey> {
        Box::new(Sm4HeaderProtectionKey(Sm4::new(&sm4_key(&key))))
    }

    fn aead_key_len(&self) -> usize {
        KEY_LEN
    }
}

/// The standard suite QUIC Initial packets use whatever the negotiated suite is
/// (AES-128-GCM with SHA-256, RFC 9001 §5.2), from rustls's ring provider. quinn
/// needs it explicitly for a provider, like this one, that lacks it.
pub fn initial_suite() -> Option<quic::Suite> {
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|suite| suite.quic_suite())
}

/// The header protection mask: SM4-ECB of the sample (RFC 9001 §5.4.3 with SM4).
/// Only the first five bytes are used.
pub fn header_mask(hp: &Sm4, sample: &[u8]) -> Result<[u8; 16], Error> {
    let mut block: [u8; SAMPLE_LEN] = sample
        .try_into()
        .map_err(|_| Error::General("QUIC header protection sample is not 16 bytes".into()))?;
    hp.encrypt_block(&mut block);
    Ok(block)
}

struct Sm4HeaderProtectionKey(Sm4);

impl Sm4HeaderProtectionKey {
    /// RFC 9001 §5.4.1: XOR the low 4 (long header) or 5 (short header) bits of the
    /// first byte and the packet number bytes with the mask. The packet number
    /// length comes from the first byte as it is *unprotected*: before masking when
    /// protecting, after when removing.
    fn apply(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
        removing: bool,
    ) -> Result<(), Error> {
        let mask = header_mask(&self.0, sample)?;
        if packet_number.len() > 4 {
            return Err(Error::General(
                "QUIC packet number longer than 4 bytes".into(),
            ));
        }
        let bits = if *first & 0x80 != 0 { 0x0f } else { 0x1f };
        let plain_first = if removing {
            *first ^ (mask[0] & bits)
        } else {
            *first
        };
        let pn_len = usize::from(plain_first & 0x03) + 1;
        *first ^= mask[0] & bits;
        for (byte, m) in packet_number.iter_mut().zip(&mask[1..]).take(pn_len) {
            *byte ^= m;
        }
        Ok(())
    }
}

impl HeaderProtectionKey for Sm4HeaderProtectionKey {
    fn encrypt_in_place(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
    ) -> Result<(), Error> {
        self.apply(sample, first, packet_number, false)
    }

    fn decrypt_in_place(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
    ) -> Result<(), Error> {
        self.apply(sample, first, packet_number, true)
    }

    fn sample_len(&self) -> usize {
        SAMPLE_LEN
    }
}

struct Sm4GcmPacketKey {
    gcm: Sm4Gcm,
    iv: Iv,
}

impl Sm4GcmPacketKey {
    fn seal(&self, nonce: Nonce, header: &[u8], payload: &mut [u8]) -> Result<Tag, Error> {
        let tag = self
            .gcm
            .seal_in_place(&nonce.0, header, payload)
            .map_err(|_| Error::EncryptError)?;
        Ok(Tag::from(&tag[..]))
    }

    fn open<'a>(
        &self,
        nonce: Nonce,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        let Some(body_len) = payload.len().checked_sub(TAG_LEN) else {
            return Err(Error::DecryptError);
        };
        let (body, tag) = payload.split_at_mut(body_len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Error::DecryptError)?;
        self.gcm
            .open_in_place(&nonce.0, header, body, tag)
            .map_err(|_| Error::DecryptError)?;
        Ok(&payload[..body_len])
    }
}

impl PacketKey for Sm4GcmPacketKey {
    fn encrypt_in_place(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<Tag, Error> {
        self.seal(Nonce::new(&self.iv, packet_number), header, payload)
    }

    fn encrypt_in_place_for_path(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<Tag, Error> {
        let nonce = Nonce::for_path(path_id, &self.iv, packet_number);
        self.seal(nonce, header, payload)
    }

    fn decrypt_in_place<'a>(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        self.open(Nonce::new(&self.iv, packet_number), header, payload)
    }

    fn decrypt_in_place_for_path<'a>(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        let nonce = Nonce::for_path(path_id, &self.iv, packet_number);
        self.open(nonce, header, payload)
    }

    fn tag_len(&self) -> usize {
        TAG_LEN
    }

    /// SM4 has AES's 128-bit block, so RFC 9001 §6.6's AES-GCM limits apply.
    fn confidentiality_limit(&self) -> u64 {
        1 << 23
    }

    fn integrity_limit(&self) -> u64 {
        1 << 52
    }
}
