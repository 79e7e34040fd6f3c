//! The HTTP transport of one target: a keep-alive client, the target's concurrency limit,
//! authentication (bearer, basic, OAuth2 client credentials with a cached token), bounded
//! response bodies, and the classification of what went wrong ([`SendError`]). It knows
//! nothing of SCIM, webhooks or events: `scim`, `webhook` and reconcile scans build on it.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};

use super::config::{is_loopback_url, Auth, TargetConfig, DEFAULT_MAX_RESPONSE_BYTES};
use crate::retry::{is_transient_status, parse_retry_after};

/// Error texts quoted from a response are cut to this many characters.
const MAX_ERROR_TEXT: usize = 300;
/// How the error of a response larger than the target's `max_response_bytes` begins (a
/// reconcile scan then asks for smaller pages: [`SendError::is_too_large`]).
const TOO_LARGE: &str = "the response body exceeds max_response_bytes";

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// One target's transport, shared by the tasks sending to it.
pub(crate) struct Client {
    pub config: TargetConfig,
    client: Result<reqwest::Client, String>,
    semaphore: Semaphore,
    token: Mutex<Option<CachedToken>>,
}

/// Why a request did not produce a usable reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SendError {
    /// Worth another try later: a connection error, a timeout, 408, 429 or 5xx.
    Transient {
        error: String,
        http_status: Option<u16>,
        retry_after: Option<Duration>,
    },
    /// Needs an operator (another 4xx, an unusable configuration or response).
    Permanent {
        error: String,
        http_status: Option<u16>,
    },
}

impl SendError {
    pub fn permanent(error: impl Into<String>) -> Self {
        SendError::Permanent {
            error: error.into(),
            http_status: None,
        }
    }

    pub fn transient(error: impl Into<String>) -> Self {
        SendError::Transient {
            error: error.into(),
            http_status: None,
            retry_after: None,
        }
    }

    /// Whether the response was larger than the target's `max_response_bytes`.
    pub fn is_too_large(&self) -> bool {
        matches!(self, SendError::Permanent { error, .. } if error.contains(TOO_LARGE))
    }

    /// The same error with `what` put in front of its text.
    pub fn context(self, what: &str) -> Self {
        match self {
            SendError::Transient {
                error,
                http_status,
                retry_after,
            } => SendError::Transient {
                error: format!("{what}: {error}"),
                http_status,
                retry_after,
            },
            SendError::Permanent { error, http_status } => SendError::Permanent {
                error: format!("{what}: {error}"),
                http_status,
            },
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Transient { error, .. } | SendError::Permanent { error, .. } => {
                f.write_str(error)
            }
        }
    }
}

/// A response, read whole (up to the target's `max_response_bytes`).
pub(crate) struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<Duration>,
    /// The media type of `Content-Type`, lower case, without parameters.
    pub content_type: Option<String>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as JSON, or what is wrong with it: "the response body is empty", "the response
    /// is an HTML page …", "the response is not valid JSON (EOF while parsing …)".
    pub fn json_or_why(&self) -> Result<Value, String> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err("the response body is empty".to_string());
        }
        if let Some(page) = self.html_page() {
            return Err(format!("the response is {page}, not JSON"));
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            let start = excerpt(&String::from_utf8_lossy(
                &self.body[..self.body.len().min(MAX_ERROR_TEXT)],
            ));
            format!("the response is not valid JSON ({e}): {start}")
        })
    }

    /// Whether the target says the body is JSON (`application/json`, `…+json`).
    pub fn says_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|t| t == "application/json" || t.ends_with("+json"))
    }

    /// `an HTML page ("Sign in")` when the body is an HTML document (a login page, a proxy's
    /// error page, a web application's catch-all route), which no API answers with.
    pub fn html_page(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(8192)]);
        let text = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        let head = text.to_ascii_lowercase();
        let html = head.starts_with("<!doctype html")
            || head.starts_with("<html")
            || (self.content_type.as_deref() == Some("text/html") && head.starts_with('<'));
        if !html {
            return None;
        }
        let title = head
            .find("<title")
            .and_then(|i| Some(i + head[i..].find('>')? + 1))
            .and_then(|from| {
                let to = from + head[from..].find("</title")?;
                // (the same byte offsets in the original text: lower-casing ASCII keeps them)
                text.get(from..to)
                    .map(|t| excerpt(t).chars().take(80).collect::<String>())
            })
            .filter(|t| !t.is_empty());
        Some(match title {
            Some(t) => format!("an HTML page (\"{t}\")"),
            None => "an HTML page".to_string(),
        })
    }

    /// The SCIM error `scimType`, if the body is a SCIM error.
    pub fn scim_type(&self) -> Option<String> {
        self.json()?.get("scimType")?.as_str().map(str::to_string)
    }

    /// The server's explanation: SCIM `detail` (with `scimType`), OAuth `error` /
    /// `error_description`, or a bounded excerpt of the body.
    pub fn error_text(&self) -> String {
        if let Some(v) = self.json() {
            let s = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
            if let Some(detail) = s("detail") {
                return match s("scimType") {
                    Some(t) => excerpt(&format!("{t}: {detail}")),
                    None => excerpt(detail),
                };
            }
            if let Some(err) = s("error") {
                return match s("error_description") {
                    Some(d) => excerpt(&format!("{err}: {d}")),
                    None => excerpt(err),
                };
            }
        }
        let text = excerpt(&String::from_utf8_lossy(&self.body));
        if text.is_empty() {
            reqwest::StatusCode::from_u16(self.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no response body")
                .to_lowercase()
        } else {
            text
        }
    }

    /// The error for a response the caller does not handle itself, classified by
    /// [`is_transient_status`]: everything else (other 4xx, unexpected 3xx or 2xx) needs an
    /// operator.
    pub fn failure(&self, what: &str) -> SendError {
        let error = format!("{what}: HTTP {}: {}", self.status, self.error_text());
        if is_transient_status(self.status) {
            SendError::Transient {
                error,
                http_status: Some(self.status),
                retry_after: self.retry_after,
            }
        } else {
            SendError::Permanent {
                error,
                http_status: Some(self.status),
            }
        }
    }
}

/// Ids a target gives us (a SCIM resource's `id`, a webhook receiver's `account_id`) are
/// stored and sent back in urls: at most this many characters.
const MAX_ID_CHARS: usize = 1024;

/// An id a target answered with, or why it is not one.
pub(crate) fn checked_id(id: &str) -> Result<String, String> {
    if id.is_empty() {
        Err("the id in the response is empty".to_string())
    } else if id.chars().count() > MAX_ID_CHARS {
        Err(format!(
            "the id in the response is longer than {MAX_ID_CHARS} characters"
        ))
    } else if id.chars().any(char::is_control) {
        Err("the id in the response contains control characters".to_string())
    } else {
        Ok(id.to_string())
    }
}

/// "an object", "an array", … for messages about a JSON value of the wrong type.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whitespace collapsed, cut to [`MAX_ERROR_TEXT`] characters.
fn excerpt(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() <= MAX_ERROR_TEXT {
        return collapsed;
    }
    let mut out: String = collapsed.chars().take(MAX_ERROR_TEXT).collect();
    out.push('…');
    out
}

/// A URL for a message: scheme, host, port and path, never a user name or password in it.
fn url_without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "an unparsable url".to_string(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for path segments and
/// query values; spaces become `%20`, which every server decodes, unlike `+`).
pub(crate) fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of a transport error, without the URL (which could carry credentials) and
/// without anything from the request.
fn transport_error(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("request timed out after {}", human(timeout));
    }
    let mut causes = Vec::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let text = s.to_string();
        // ("client error (SendRequest)" and the like name a step of the HTTP library's, not
        // what went wrong)
        if !causes.contains(&text) && !text.starts_with("client error (") {
            causes.push(text);
        }
        src = s.source();
    }
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    if causes.is_empty() {
        kind.to_string()
    } else {
        excerpt(&format!("{kind}: {}", causes.join(": ")))
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl Client {
    pub fn new(config: TargetConfig) -> Self {
        let client = Self::build(&config);
        let permits = config.max_concurrency.clamp(1, Semaphore::MAX_PERMITS);
        Client {
            config,
            client,
            semaphore: Semaphore::new(permits),
            token: Mutex::new(None),
        }
    }

    /// The HTTP client, or why there is none: TLS certificates are verified (against the public
    /// roots and the target's `ca_file`), plain HTTP goes to loopback hosts only unless the
    /// target allows it, redirects are never followed (a redirect would re-send a POST as GET,
    /// or send credentials elsewhere), and connect and total timeouts are always set.
    fn build(config: &TargetConfig) -> Result<reqwest::Client, String> {
        for url in std::iter::once(config.url.as_str()).chain(match &config.auth {
            Auth::OAuth2 { token_url, .. } => Some(token_url.as_str()),
            _ => None,
        }) {
            if url
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
                && !config.allow_insecure_http
                && !is_loopback_url(url)
            {
                return Err(format!(
                    "plain http to a host that is not a loopback address is refused ({}); use https, or set the target option allow_insecure_http",
                    url_without_credentials(url)
                ));
            }
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("identity_sync/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "ca_file {} holds no usable certificate: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map_err(|e| {
            format!(
                "cannot create the HTTP client: {}",
                transport_error(&e, config.timeout)
            )
        })
    }

    fn max_body(&self) -> usize {
        match self.config.max_response_bytes {
            0 => DEFAULT_MAX_RESPONSE_BYTES,
            n => n,
        }
    }

    /// A place among the target's `max_concurrency` requests in flight; hold it while sending.
    pub async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SendError> {
        self.semaphore
            .acquire()
            .await
            .map_err(|_| SendError::transient("target is being reconfigured"))
    }

    /// Sends one request with authentication (and `Idempotency-Key` when it delivers an
    /// event), and reads the reply. With OAuth2, a 401 fetches a fresh token and the request is
    /// sent once more.
    pub async fn send(
        &self,
        idempotency_key: Option<i64>,
        method: Method,
        url: &str,
        body: Option<(&'static str, Vec<u8>)>,
        headers: &[(&'static str, String)],
    ) -> Result<Reply, SendError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| SendError::permanent(e.clone()))?;
        let mut used_token: Option<String> = None;
        for attempt in 0..2 {
            let mut rb = client.request(method.clone(), url);
            if let Some(key) = idempotency_key {
                rb = rb.header("Idempotency-Key", key.to_string());
            }
            rb = rb.header(
                ACCEPT,
                HeaderValue::from_static("application/scim+json, application/json"),
            );
            for (k, v) in headers {
                rb = rb.header(*k, v.as_str());
            }
            if let Some((ct, bytes)) = &body {
                rb = rb.header(CONTENT_TYPE, *ct).body(bytes.clone());
            }
            let (rb, token) = self.authorize(rb, used_token.as_deref()).await?;
            used_token = token;
            let reply = self.execute(rb).await?;
            if reply.status == 401 && attempt == 0 && used_token.is_some() {
                continue; // the token may have been revoked or expired early: fetch a new one
            }
            return Ok(reply);
        }
        Err(SendError::permanent("unreachable: retry loop ended"))
    }

    async fn execute(&self, rb: RequestBuilder) -> Result<Reply, SendError> {
        let mut resp = rb
            .send()
            .await
            .map_err(|e| SendError::transient(transport_error(&e, self.config.timeout)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_body() {
                        return Err(SendError::Permanent {
                            error: format!("{TOO_LARGE} ({} bytes)", self.max_body()),
                            http_status: Some(status),
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(SendError::Transient {
                        error: transport_error(&e, self.config.timeout),
                        http_status: Some(status),
                        retry_after,
                    })
                }
            }
        }
        let reply = Reply {
            status,
            body,
            retry_after,
            content_type,
        };
        // A success that is a web page was not answered by the target's API (a login page in
        // front of it, a web application at that url): nothing in it can be used.
        if reply.ok() {
            if let Some(page) = reply.html_page() {
                return Err(SendError::Permanent {
                    error: format!(
                        "HTTP {status} with {page} instead of an answer of the target's API; is the url right?"
                    ),
                    http_status: Some(status),
                });
            }
        }
        Ok(reply)
    }

    /// Adds the `Authorization` header. For OAuth2 returns the token used, so that a 401 can
    /// replace exactly that token (and not one another task has just fetched).
    async fn authorize(
        &self,
        rb: RequestBuilder,
        stale: Option<&str>,
    ) -> Result<(RequestBuilder, Option<String>), SendError> {
        Ok(match &self.config.auth {
            Auth::None => (rb, None),
            Auth::Bearer { token } => (
                rb.bearer_auth(token.read().map_err(SendError::transient)?),
                None,
            ),
            Auth::Basic { username, password } => (
                rb.basic_auth(
                    username,
                    Some(password.read().map_err(SendError::transient)?),
                ),
                None,
            ),
            Auth::OAuth2 { .. } => {
                let token = self.oauth_token(stale).await?;
                (rb.bearer_auth(&token), Some(token))
            }
        })
    }

    async fn oauth_token(&self, stale: Option<&str>) -> Result<String, SendError> {
        let Auth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
        } = &self.config.auth
        else {
            return Err(SendError::permanent("target does not use oauth2"));
        };
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref() {
            if Instant::now() < t.refresh_at && stale != Some(t.value.as_str()) {
                return Ok(t.value.clone());
            }
        }
        let client = self
            .client
            .as_ref()
            .map_err(|e| SendError::permanent(e.clone()))?;
        let client_secret = client_secret.read().map_err(SendError::transient)?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.as_str()),
        ];
        if let Some(s) = scope {
            form.push(("scope", s.as_str()));
        }
        let rb = client
            .post(token_url)
            .header(ACCEPT, "application/json")
            .form(&form);
        let reply = self
            .execute(rb)
            .await
            .map_err(|e| e.context("oauth2 token request"))?;
        if !reply.ok() {
            return Err(reply.failure("oauth2 token request"));
        }
        let json = reply.json().unwrap_or(Value::Null);
        let Some(token) = json.get("access_token").and_then(Value::as_str) else {
            return Err(SendError::permanent(
                "oauth2 token response has no access_token",
            ));
        };
        let lifetime = json
            .get("expires_in")
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
            .map_or(Duration::from_secs(300), Duration::from_secs);
        // Refresh a little early so a token does not expire between our check and its use.
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        *cached = Some(CachedToken {
            value: token.to_string(),
            refresh_at: Instant::now() + lifetime - margin,
        });
        Ok(token.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.as_bytes().to_vec(),
            retry_after: None,
            content_type: None,
        }
    }

    #[test]
    fn unusable_bodies_say_why() {
        let typed = |ct: &str, body: &str| Reply {
            content_type: Some(ct.to_string()),
            ..reply(200, body)
        };
        assert_eq!(
            reply(200, " \n").json_or_why().unwrap_err(),
            "the response body is empty"
        );
        let e = reply(201, r#"{"id": "a"#).json_or_why().unwrap_err();
        assert!(
            e.starts_with("the response is not valid JSON (EOF while parsing"),
            "{e}"
        );
        assert!(e.ends_with(r#": {"id": "a"#), "{e}");
        let page =
            "\u{feff}\n<!DOCTYPE html><html><head><TITLE>Sign in – Corp SSO</TITLE></head></html>";
        assert_eq!(
            reply(200, page).json_or_why().unwrap_err(),
            "the response is an HTML page (\"Sign in – Corp SSO\"), not JSON"
        );
        assert_eq!(
            typed("text/html", "<p>maintenance</p>")
                .html_page()
                .as_deref(),
            Some("an HTML page")
        );
        // PHP and others say text/html for any answer: a plain "ok" is not a page.
        assert_eq!(typed("text/html", "ok").html_page(), None);
        assert_eq!(reply(200, r#"{"a": "<html>"}"#).html_page(), None);
        assert!(typed("application/scim+json", "{}").says_json());
        assert!(!typed("text/plain", "{}").says_json());
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            reply(
                409,
                r#"{"status":"409","scimType":"uniqueness","detail":"taken"}"#
            )
            .error_text(),
            "uniqueness: taken"
        );
        assert_eq!(
            reply(
                401,
                r#"{"error":"invalid_client","error_description":"bad"}"#
            )
            .error_text(),
            "invalid_client: bad"
        );
        assert_eq!(reply(404, "").error_text(), "not found");
        assert_eq!(reply(400, "  a\n\n b ").error_text(), "a b");
        let long = "x".repeat(5000);
        assert_eq!(
            reply(400, &long).error_text().chars().count(),
            MAX_ERROR_TEXT + 1
        );
    }

    #[test]
    fn classification() {
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(
                matches!(reply(s, "").failure("x"), SendError::Transient { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 409, 422, 302] {
            assert!(
                matches!(reply(s, "").failure("x"), SendError::Permanent { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(pct(r#"userName eq "a b""#), "userName%20eq%20%22a%20b%22");
        assert_eq!(pct("ü/"), "%C3%BC%2F");
    }
}
