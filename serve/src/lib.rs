//! What every ARL server does at its edge, written once for `arl-manager` and the
//! `arl-operator` gateway: serve HTTP and gRPC with TCP_NODELAY on every connection, stop on
//! SIGTERM or Ctrl-C, and let in only callers that present the bearer token.
#![forbid(unsafe_code)]

use std::future::Future;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Serves `router` on `listener` with TCP_NODELAY on every connection (small JSON answers
/// must not wait ~40 ms for delayed ACKs), until `shutdown` resolves; then waits for the
/// requests in flight.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `listener`'s connections for a tonic server, each with TCP_NODELAY.
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Resolves on SIGTERM or Ctrl-C, whichever comes first.
pub async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// The bearer token a server asks of its callers, when it has one. Kept as its SHA-256 so
/// that a comparison takes the same time whatever the token's length and wherever a guess
/// first differs.
#[derive(Clone, Copy, Default)]
pub struct Bearer {
    digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("required", &self.required())
            .finish()
    }
}

impl Bearer {
    /// Requires `token` when it is `Some`; lets everyone in otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// Whether callers must present a token.
    pub fn required(&self) -> bool {
        self.digest.is_some()
    }

    /// Whether an `Authorization` value (HTTP header or gRPC metadata) lets the caller in.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        match authorization.map(|h| h.strip_prefix(b"Bearer ")) {
            _ if self.digest.is_none() => true,
            Some(Some(token)) => self.allows_key(token),
            _ => false,
        }
    }

    /// Whether a request lets the caller in: by its `Authorization` header, or, for clients
    /// that cannot send one (SandboxFusion's), by a path under [`PATH_TOKEN_PREFIX`] whose
    /// next segment is the token.
    pub fn allows_request(&self, path: &str, authorization: Option<&[u8]>) -> bool {
        self.allows(authorization)
            || path_token(path).is_some_and(|token| self.allows_key(token.as_bytes()))
    }

    /// Whether `token`, as given bare (an API key header), is the token.
    pub fn allows_key(&self, token: &[u8]) -> bool {
        let Some(expected) = &self.digest else {
            return true;
        };
        let given: [u8; 32] = Sha256::digest(token).into();
        given.ct_eq(expected).into()
    }

    /// A tonic interceptor that refuses a call without the token, `UNAUTHENTICATED` with
    /// `refusal` as its message.
    pub fn interceptor(
        self,
        refusal: &'static str,
    ) -> impl tonic::service::Interceptor + Clone + use<> {
        move |request: Request<()>| {
            let given = request.metadata().get("authorization");
            if self.allows(given.map(|v| v.as_bytes())) {
                Ok(request)
            } else {
                Err(Status::unauthenticated(refusal))
            }
        }
    }
}

/// Paths under this prefix carry the token as their next segment
/// (`/fusion/<token>/run_code`), for clients that cannot send a header: SandboxFusion's, which
/// take only a base URL.
pub const PATH_TOKEN_PREFIX: &str = "/fusion/";

/// The token a path under [`PATH_TOKEN_PREFIX`] carries.
pub fn path_token(path: &str) -> Option<&str> {
    let (token, _) = path.strip_prefix(PATH_TOKEN_PREFIX)?.split_once('/')?;
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_token_opens() {
        let bearer = Bearer::new(Some("s3cret"));
        assert!(bearer.required());
        assert!(bearer.allows(Some(b"Bearer s3cret")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"s3cret",
            b"Basic s3cret",
            b"",
        ] {
            assert!(!bearer.allows(Some(bad)), "{bad:?}");
        }
        assert!(!bearer.allows(None));
        assert!(Bearer::new(None).allows(None));
        assert!(!Bearer::new(None).required());
    }

    #[test]
    fn a_path_token_opens_only_its_own_prefix() {
        let bearer = Bearer::new(Some("s3cret"));
        assert!(bearer.allows_request("/fusion/s3cret/run_code", None));
        for bad in [
            "/fusion/s3cre/run_code",
            "/fusion/s3cret",
            "/fusion//run_code",
            "/run_code",
            "/v1/fusion/s3cret/run_code",
            "/fusion/Bearer s3cret/run_code",
        ] {
            assert!(!bearer.allows_request(bad, None), "{bad}");
        }
        assert_eq!(path_token("/fusion/abc/v1/ping"), Some("abc"));
    }

    #[test]
    fn the_interceptor_refuses_without_the_token() {
        use tonic::service::Interceptor;
        let mut check = Bearer::new(Some("s3cret")).interceptor("no token");
        let refused = check.call(Request::new(())).err();
        assert_eq!(
            refused.map(|s| s.code()),
            Some(tonic::Code::Unauthenticated)
        );
        let mut request = Request::new(());
        request.metadata_mut().insert(
            "authorization",
            tonic::metadata::MetadataValue::from_static("Bearer s3cret"),
        );
        assert!(check.call(request).is_ok());
    }
}
