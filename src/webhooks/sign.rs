//! Standard Webhooks 1.0 signatures: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`
//! under the endpoint's secret, one per secret while a secret rotates (space-separated), so a
//! receiver verifies with any Standard Webhooks library. Pure: no I/O, no clock.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How Standard Webhooks writes a secret: this prefix, then its bytes in base64.
const PREFIX: &str = "whsec_";
/// The spec's bounds on a secret's length, in bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// `whsec_` and 24 to 64 bytes in base64, as Standard Webhooks writes a secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(encoded) = text.trim().strip_prefix(PREFIX) else {
            return Err("a webhook secret is `whsec_` followed by base64".into());
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|err| format!("a webhook secret's base64 is invalid: {err}"))?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(format!(
                "a webhook secret holds 24 to 64 bytes, not {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

/// The `webhook-signature` header of a message `id` sent at `timestamp` (Unix seconds) with
/// `body`: a signature for each of `secrets`, in their order.
pub fn signature(secrets: &[Secret], id: &str, timestamp: u64, body: &[u8]) -> String {
    let signed: Vec<String> = secrets
        .iter()
        .map(|secret| {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect();
    signed.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        // The example of the Standard Webhooks specification (and of its libraries' tests).
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_rotating_endpoint_gets_one_signature_per_secret() {
        let old = Secret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 32]))).unwrap();
        let new = Secret::parse(&format!("whsec_{}", STANDARD.encode([2u8; 32]))).unwrap();
        let both = signature(&[new.clone(), old.clone()], "id", 5, b"{}");
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(
            parts,
            [
                signature(&[new], "id", 5, b"{}"),
                signature(&[old], "id", 5, b"{}")
            ]
        );
    }

    #[test]
    fn a_secret_must_be_written_as_the_spec_writes_it() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([0u8; 8]))).is_err());
        assert!(format!(
            "{:?}",
            Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        )
        .contains("hidden"));
    }
}
