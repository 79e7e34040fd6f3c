//! Standard Webhooks signatures (<https://www.standardwebhooks.com>).
//!
//! The signature is `v1,` followed by the base64 HMAC-SHA256 of `"{id}.{timestamp}.{body}"`,
//! keyed with the secret's decoded bytes. Receivers verify it with the standard's libraries, so
//! the key handling follows the reference implementations exactly.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The prefix the standard puts before a secret's base64 text.
pub const SECRET_PREFIX: &str = "whsec_";

/// Base64 that accepts the secret with or without `=` padding, as the reference libraries do.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a signing secret was refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The text after `whsec_` (or the whole secret without it) is not base64.
    #[error("webhook signing secret is not valid base64")]
    NotBase64,
    /// The secret decodes to no bytes.
    #[error("webhook signing secret is empty")]
    Empty,
}

/// A decoded signing key. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Decodes a secret: `whsec_<base64>`, the prefix being optional.
    ///
    /// A secret without the prefix is read as base64 too — that is what the reference
    /// libraries do, so `whsec_X` and `X` are one key for us and for every receiver. A secret
    /// that is not base64 is refused rather than used as raw bytes, because a receiver's
    /// library would base64-decode it and never verify our signatures; an administrator should
    /// learn that at `set_secret` time, not from a receiver rejecting every event.
    pub fn from_secret(secret: &str) -> Result<Self, WebhookError> {
        let b64 = secret.trim();
        let b64 = b64.strip_prefix(SECRET_PREFIX).unwrap_or(b64);
        let key = LENIENT.decode(b64).map_err(|_| WebhookError::NotBase64)?;
        if key.is_empty() {
            return Err(WebhookError::Empty);
        }
        Ok(SigningKey(key))
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so new_from_slice cannot fail; the fallback keeps
        // this free of panics all the same.
        let mut mac = HmacSha256::new_from_slice(&self.0)
            .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()));
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value: `v1,<base64 signature>`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(msg_id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// Whether a `webhook-signature` header (space-separated `v1,<base64>` entries) holds a
    /// valid signature of this message, compared in constant time. Timestamps are not
    /// checked for age here: that is the receiver's policy.
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header.split_whitespace().any(|entry| {
            let Some(sig) = entry.strip_prefix("v1,") else {
                return false;
            };
            let Ok(sig) = STANDARD.decode(sig) else {
                return false;
            };
            self.mac(msg_id, timestamp, body).verify_slice(&sig).is_ok()
        })
    }
}

/// Signs a message with a `whsec_…` secret; see [`SigningKey::from_secret`] for the secret.
pub fn sign(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, WebhookError> {
    Ok(SigningKey::from_secret(secret)?.sign(msg_id, timestamp, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example vector published with the standard and its reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_published_vector() {
        assert_eq!(sign(SECRET, ID, TS, BODY).unwrap(), SIG);
    }

    #[test]
    fn the_prefix_is_optional() {
        assert_eq!(
            sign("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", ID, TS, BODY).unwrap(),
            SIG
        );
    }

    #[test]
    fn verifies_and_rejects() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        assert!(key.verify(ID, TS, BODY, SIG));
        assert!(key.verify(ID, TS, BODY, &format!("v1,bm9wZQ== {SIG}")));
        assert!(!key.verify(ID, TS + 1, BODY, SIG));
        assert!(!key.verify(ID, TS, b"{}", SIG));
        assert!(!key.verify(ID, TS, BODY, "v2,abc"));
        assert!(!key.verify(ID, TS, BODY, ""));
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let err = SigningKey::from_secret("whsec_not base64!!").unwrap_err();
        assert_eq!(err, WebhookError::NotBase64);
        assert!(!err.to_string().contains("not base64!!"));
        assert_eq!(
            SigningKey::from_secret("whsec_").unwrap_err(),
            WebhookError::Empty
        );
        let key = SigningKey::from_secret(SECRET).unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
    }
}
