//! A target as the HTTP side sees it: its protocol, address, authentication and limits, loaded
//! by the worker from `identity_sync.target` (src/deliver/targets.rs).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A secret: given with `set_secret` (stored in the database), or held in a file the server
/// can read (target option `secret_file`), read each time it is used, so that replacing the
/// file rotates the secret without a restart and the secret never appears in SQL text.
/// `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The secret itself.
    Value(String),
    /// An absolute path to a file holding the secret (surrounding white space is ignored).
    File(PathBuf),
}

impl Secret {
    /// The secret's text; for a file, its contents now.
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secret::Value(v) => Ok(v.clone()),
            Secret::File(path) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
                Ok(_) => Err(format!("secret_file {} is empty", path.display())),
                Err(e) => Err(format!("cannot read secret_file {}: {e}", path.display())),
            },
        }
    }
}

impl Default for Secret {
    fn default() -> Self {
        Secret::Value(String::new())
    }
}

impl From<&str> for Secret {
    fn from(v: &str) -> Self {
        Secret::Value(v.to_string())
    }
}

impl From<String> for Secret {
    fn from(v: String) -> Self {
        Secret::Value(v)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("<redacted>"),
            Secret::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

/// Responses larger than this fail unless a target sets `max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// What protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetKind {
    /// SCIM 2.0 (RFC 7643/7644); the URL is the service's base, e.g. `https://h/scim/v2`.
    #[default]
    Scim,
    /// JSON POSTed to the URL, signed per Standard Webhooks when a signing secret is set.
    Webhook,
}

/// How requests authenticate. `Debug` shows no secret (`Secret` hides its value).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No `Authorization` header.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The static token.
        token: Secret,
    },
    /// HTTP basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
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
        client_secret: Secret,
        /// The requested scope, if any.
        scope: Option<String>,
    },
}

/// One target as the delivery thread needs it. `Debug` shows no secret value (see `Secret`).
#[derive(Debug, Clone, PartialEq, Default)]
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
    pub signing_secret: Option<Secret>,
    /// Whole-request timeout (connect, send, receive).
    pub timeout: Duration,
    /// Requests in flight for this target at most (0 is taken as 1).
    pub max_concurrency: usize,
    /// SCIM: attribute path looked up before a create to link an existing account.
    pub correlate_on: Option<String>,
    /// SCIM: create a group that does not exist on grant.
    pub create_groups: bool,
    /// PEM file with the certificate(s) of a private CA to trust besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// Send plain `http://` to a host that is not a loopback address.
    pub allow_insecure_http: bool,
    /// A response body larger than this fails the request (0 means the default, 1 MB).
    pub max_response_bytes: usize,
}

/// Whether `url` names a loopback host (`localhost`, 127.0.0.0/8, `[::1]`), where plain HTTP
/// cannot be overheard.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}
