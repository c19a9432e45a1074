//! The bearer token that guards the HTTP and gRPC APIs when `--auth-token` is set.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The expected token, kept as its SHA-256 so that comparing takes the same time whatever the
/// token's length and wherever a guess first differs.
#[derive(Clone)]
pub struct Auth {
    digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("required", &self.digest.is_some())
            .finish()
    }
}

impl Auth {
    /// Requires `token` when it is `Some`; lets everyone in otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    pub fn required(&self) -> bool {
        self.digest.is_some()
    }

    /// Whether an `Authorization` header value lets the caller in.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.digest else {
            return true;
        };
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(token).into();
        given.ct_eq(expected).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_token_opens() {
        let auth = Auth::new(Some("s3cret"));
        assert!(auth.allows(Some(b"Bearer s3cret")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"s3cret",
            b"Basic s3cret",
            b"",
        ] {
            assert!(!auth.allows(Some(bad)), "{bad:?}");
        }
        assert!(!auth.allows(None));
        assert!(Auth::new(None).allows(None));
    }
}
