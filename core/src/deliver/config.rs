//! A target as the HTTP side sees it: its protocol, address, authentication and limits, loaded
//! by the worker from `identity_sync.target` (src/deliver/targets.rs).

use std::fmt;
use std::time::Duration;

/// What protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// SCIM 2.0 (RFC 7643/7644); the URL is the service's base, e.g. `https://h/scim/v2`.
    Scim,
    /// JSON POSTed to the URL, signed per Standard Webhooks when a signing secret is set.
    Webhook,
}

/// How requests authenticate. `Debug` shows the kind and non-secret fields only.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No `Authorization` header.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The static token.
        token: String,
    },
    /// HTTP basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// OAuth 2.0 client credentials grant (RFC 6749 §4.4). The client authenticates with
    /// `client_id` and `client_secret` in the form body (`client_secret_post`); the token is
    /// cached until shortly before it expires and fetched again once when a request gets 401.
    OAuth2 {
        /// The token endpoint.
        token_url: String,
        /// The client id.
        client_id: String,
        /// The client secret.
        client_secret: String,
        /// The requested scope, if any.
        scope: Option<String>,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Bearer { .. } => f.write_str("Bearer { token: <redacted> }"),
            Auth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Auth::OAuth2 {
                token_url,
                client_id,
                scope,
                ..
            } => f
                .debug_struct("OAuth2")
                .field("token_url", token_url)
                .field("client_id", client_id)
                .field("client_secret", &"<redacted>")
                .field("scope", scope)
                .finish(),
        }
    }
}

/// One target as the delivery thread needs it.
#[derive(Clone, PartialEq)]
pub struct TargetConfig {
    /// The target's id in `identity_sync`.
    pub id: i32,
    /// The target's name, for messages and the webhook payload.
    pub name: String,
    /// SCIM or webhook.
    pub kind: TargetKind,
    /// SCIM base URL (without a trailing `/Users`) or the webhook URL.
    pub url: String,
    /// Authentication.
    pub auth: Auth,
    /// Standard Webhooks secret (`whsec_<base64>`); webhooks only.
    pub signing_secret: Option<String>,
    /// Whole-request timeout (connect, send, receive).
    pub timeout: Duration,
    /// Requests in flight for this target at most (0 is taken as 1).
    pub max_concurrency: usize,
    /// SCIM: attribute path looked up before a create to link an existing account.
    pub correlate_on: Option<String>,
    /// SCIM: create a group that does not exist on grant.
    pub create_groups: bool,
}

impl fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("correlate_on", &self.correlate_on)
            .field("create_groups", &self.create_groups)
            .finish()
    }
}
