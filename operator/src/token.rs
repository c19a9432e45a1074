//! Per-pool manager tokens, derived from one operator key so that no Secret is ever read.
//!
//! The WarmPool controller applies each pool's token as the Secret its pods take
//! `ARL_AUTH_TOKEN` from; the controllers and the gateway derive the same token to call those
//! pods. The operator therefore needs to write Secrets but never to read one.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key tokens derive from (`ARL_TOKEN_KEY`).
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// At least 16 bytes, so that a token cannot be guessed.
    pub fn new(key: impl Into<Vec<u8>>) -> crate::Result<Self> {
        let key = key.into();
        if key.len() < 16 {
            return Err(crate::Error::Config(
                "the token key must be at least 16 bytes".into(),
            ));
        }
        Ok(Self(key))
    }

    /// The bearer token of the managers of pool `namespace/pool`.
    pub fn pool_token(&self, namespace: &str, pool: &str) -> String {
        // NOTE: HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(b"arl-pool-token\0");
        mac.update(namespace.as_bytes());
        mac.update(b"/");
        mac.update(pool.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn tokens_are_stable_and_differ_by_pool_and_key() {
        let key = TokenKey::new("0123456789abcdef").unwrap();
        let a = key.pool_token("ns", "pool");
        assert_eq!(a, key.pool_token("ns", "pool"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, key.pool_token("ns", "pool2"));
        assert_ne!(a, key.pool_token("ns2", "pool"));
        assert_ne!(
            a,
            TokenKey::new("0123456789abcdeX")
                .unwrap()
                .pool_token("ns", "pool")
        );
        assert!(TokenKey::new("short").is_err());
    }
}
