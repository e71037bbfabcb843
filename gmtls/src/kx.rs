//! Key exchange group curveSM2 (RFC 8998 §3.1.2): ephemeral ECDH on the SM2 curve
//! with uncompressed points, the shared secret being the x-coordinate, as TLS 1.3
//! does for the NIST curves (not the GB/T 32918.3 key agreement protocol).

use ferry_gm::Sm2EcdhKey;
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// Length of an uncompressed SEC1 point on curveSM2 (0x04 || x || y).
pub const POINT_LEN: usize = 65;

/// curveSM2.
#[derive(Debug)]
pub struct CurveSm2;

/// The one instance the provider lists.
pub static CURVE_SM2: CurveSm2 = CurveSm2;

impl SupportedKxGroup for CurveSm2 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let key = Sm2EcdhKey::generate().map_err(|_| Error::FailedToGetRandomBytes)?;
        let public = key.public_key_sec1();
        Ok(Box::new(ActiveSm2 { key, public }))
    }

    fn name(&self) -> NamedGroup {
        crate::curve_sm2()
    }
}

struct ActiveSm2 {
    key: Sm2EcdhKey,
    public: Vec<u8>,
}

impl ActiveKeyExchange for ActiveSm2 {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        // RFC 8446 §4.2.8.2 allows only the uncompressed form; ferry-gm checks the
        // point is on the curve and not the identity.
        if peer_pub_key.len() != POINT_LEN || peer_pub_key[0] != 0x04 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let shared = zeroize::Zeroizing::new(
            self.key
                .agree(peer_pub_key)
                .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?,
        );
        Ok(SharedSecret::from(&shared[..]))
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        crate::curve_sm2()
    }
}
