//! Sending notifications: mail over SMTP (lettre: STARTTLS or implicit TLS with rustls, AUTH
//! with a password from a file) and JSON posts to chat webhooks (Slack and Teams incoming
//! webhooks read `text`), signed per Standard Webhooks when a signing key is set.
//!
//! [`Notifier`] runs the sends on a tokio runtime in a thread of its own, as
//! [`crate::deliver::Dispatcher`] does for targets: [`Notifier::submit`] returns at once, the
//! outcomes are taken later with [`Notifier::take_outcomes`], so the worker never waits for a
//! relay. Each relay (SMTP URL) or webhook URL has its own limit of messages in flight. Every
//! send has a timeout; failures are classified here as transient (worth another try: the
//! connection, a timeout, a 4xx SMTP reply, HTTP 408/429/5xx per [`crate::retry`]) or not.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::deliver::{is_loopback_url, Secret};
use crate::retry::is_transient_status;
use crate::webhook_sign::SigningKey;

/// How a notice is sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Channel {
    /// Mail through an SMTP relay.
    Mail {
        /// `smtps://[user@]host[:port]`, `smtp://[user@]host[:port][?tls=required|opportunistic]`.
        smtp_url: String,
        /// The From address.
        from: String,
        /// The SMTP password (the user is the one in `smtp_url`).
        password: Option<Secret>,
    },
    /// A JSON POST to an incoming webhook.
    Webhook {
        /// Where to POST.
        url: String,
        /// A `whsec_…` signing key.
        signing_secret: Option<Secret>,
    },
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Channel::Mail { smtp_url, from, .. } => f
                .debug_struct("Mail")
                .field("smtp_url", &redact_url(smtp_url))
                .field("from", from)
                .finish_non_exhaustive(),
            Channel::Webhook { url, .. } => f
                .debug_struct("Webhook")
                .field("url", &redact_url(url))
                .finish_non_exhaustive(),
        }
    }
}

impl Channel {
    /// The relay or webhook the concurrency limit is per.
    fn endpoint(&self) -> String {
        match self {
            Channel::Mail { smtp_url, .. } => format!("mail {smtp_url}"),
            Channel::Webhook { url, .. } => format!("webhook {url}"),
        }
    }
}

/// One message to send (a claimed notice).
#[derive(Debug, Clone)]
pub struct Notice {
    /// The notice's id (`identity_sync.notice.id`), also the webhook's message id.
    pub id: i64,
    /// The rule's name.
    pub notification: String,
    /// How to send it.
    pub channel: Channel,
    /// A mail address, or for a webhook whatever the rule's recipients gave (a channel, a name).
    pub recipient: String,
    /// Subject line.
    pub subject: String,
    /// Plain text.
    pub body: String,
    /// Per message.
    pub timeout: Duration,
    /// Messages in flight for this relay or webhook at most.
    pub max_concurrency: usize,
}

/// What became of a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// Accepted by the relay or the webhook.
    Sent {
        /// The notice.
        id: i64,
    },
    /// Not sent; `transient` says whether another try may succeed.
    Failed {
        /// The notice.
        id: i64,
        /// Why, without secrets.
        error: String,
        /// Worth another try.
        transient: bool,
    },
}

impl NoticeOutcome {
    /// The notice's id.
    pub fn id(&self) -> i64 {
        match self {
            NoticeOutcome::Sent { id } | NoticeOutcome::Failed { id, .. } => *id,
        }
    }

    fn failed(id: i64, error: impl Into<String>, transient: bool) -> Self {
        NoticeOutcome::Failed {
            id,
            error: error.into(),
            transient,
        }
    }
}

/// A URL without a password in it, for messages.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".to_string(),
    }
}

/// Sends one notice by its channel (`client` posts webhooks).
pub async fn send(client: &reqwest::Client, notice: &Notice) -> NoticeOutcome {
    match &notice.channel {
        Channel::Mail {
            smtp_url,
            from,
            password,
        } => send_mail(notice, smtp_url, from, password.as_ref()).await,
        Channel::Webhook {
            url,
            signing_secret,
        } => send_webhook(client, notice, url, signing_secret.as_ref()).await,
    }
}

/// Sends one mail through the relay `smtp_url`.
async fn send_mail(
    notice: &Notice,
    smtp_url: &str,
    from: &str,
    password: Option<&Secret>,
) -> NoticeOutcome {
    let id = notice.id;
    if smtp_url.trim().is_empty() {
        return NoticeOutcome::failed(
            id,
            "no SMTP relay: set identity_sync.smtp_url or the rule's option smtp_url",
            true,
        );
    }
    let url = match url::Url::parse(smtp_url) {
        Ok(u) => u,
        Err(e) => return NoticeOutcome::failed(id, format!("invalid smtp_url: {e}"), false),
    };
    let tls = url
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.to_string());
    let encrypted = url.scheme() == "smtps" || tls.is_some();
    if !encrypted && !is_loopback_url(&url.to_string().replacen("smtp", "http", 1)) {
        return NoticeOutcome::failed(
            id,
            format!(
                "plain smtp to a host that is not a loopback address is refused ({}); use smtps:// or ?tls=required",
                redact_url(smtp_url)
            ),
            false,
        );
    }
    let builder = match AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url) {
        Ok(b) => b,
        Err(e) => {
            return NoticeOutcome::failed(
                id,
                format!("invalid smtp_url {}: {e}", redact_url(smtp_url)),
                false,
            )
        }
    };
    let mut builder = builder.timeout(Some(notice.timeout));
    if let Some(secret) = password {
        let password = match secret.read() {
            Ok(p) => p,
            Err(e) => return NoticeOutcome::failed(id, e, true),
        };
        let user = percent_decode(url.username());
        if user.is_empty() {
            return NoticeOutcome::failed(
                id,
                "secret_file is set but smtp_url names no user (smtps://user@host)",
                false,
            );
        }
        builder = builder.credentials(Credentials::new(user, password));
    }
    let transport = builder.build();
    let from: Mailbox = match from.parse() {
        Ok(m) => m,
        Err(e) => return NoticeOutcome::failed(id, format!("invalid from address: {e}"), false),
    };
    // One recipient is one message; it may name several addresses ("ops@x, oncall@x").
    let to: Mailboxes = match notice.recipient.parse() {
        Ok(m) => m,
        Err(e) => {
            return NoticeOutcome::failed(
                id,
                format!("invalid recipient address {:?}: {e}", notice.recipient),
                false,
            )
        }
    };
    let mut builder = lettre::Message::builder()
        .from(from)
        .subject(notice.subject.replace(['\r', '\n'], " "))
        .header(ContentType::TEXT_PLAIN);
    let mut any = false;
    for mailbox in to {
        builder = builder.to(mailbox);
        any = true;
    }
    if !any {
        return NoticeOutcome::failed(id, "no recipient address", false);
    }
    let message = match builder.body(notice.body.clone()) {
        Ok(m) => m,
        Err(e) => return NoticeOutcome::failed(id, format!("cannot build the mail: {e}"), false),
    };
    // (lettre's own timeout covers each command; this bounds the whole conversation)
    match tokio::time::timeout(notice.timeout * 3, transport.send(message)).await {
        Ok(Ok(_)) => NoticeOutcome::Sent { id },
        Ok(Err(e)) => {
            let transient = !e.is_permanent();
            NoticeOutcome::failed(id, format!("smtp {}: {e}", redact_url(smtp_url)), transient)
        }
        Err(_) => NoticeOutcome::failed(
            id,
            format!("smtp {}: timed out", redact_url(smtp_url)),
            true,
        ),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON a webhook notice posts: `text` for Slack and Teams incoming webhooks, the parts
/// for other receivers.
pub fn webhook_payload(notice: &Notice) -> serde_json::Value {
    json!({
        "text": format!("*{}*\n{}", notice.subject, notice.body),
        "id": notice.id,
        "notification": notice.notification,
        "recipient": notice.recipient,
        "subject": notice.subject,
        "body": notice.body,
    })
}

/// Posts one webhook notice to `url`.
async fn send_webhook(
    client: &reqwest::Client,
    notice: &Notice,
    url: &str,
    signing_secret: Option<&Secret>,
) -> NoticeOutcome {
    let id = notice.id;
    if url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        && !is_loopback_url(url)
    {
        return NoticeOutcome::failed(
            id,
            format!(
                "plain http to a host that is not a loopback address is refused ({}); use https",
                redact_url(url)
            ),
            false,
        );
    }
    let body = serde_json::to_vec(&webhook_payload(notice)).unwrap_or_default();
    let msg_id = format!("notice_{id}");
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut request = client
        .post(url)
        .timeout(notice.timeout)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(secret) = signing_secret {
        let secret = match secret.read() {
            Ok(s) => s,
            Err(e) => return NoticeOutcome::failed(id, e, true),
        };
        match SigningKey::from_secret(&secret) {
            Ok(key) => {
                request = request.header("webhook-signature", key.sign(&msg_id, timestamp, &body))
            }
            Err(e) => {
                return NoticeOutcome::failed(id, format!("cannot sign the webhook: {e}"), false)
            }
        }
    }
    match request.body(body).send().await {
        Ok(reply) if reply.status().is_success() => NoticeOutcome::Sent { id },
        Ok(reply) => {
            let status = reply.status().as_u16();
            let text: String = reply
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            NoticeOutcome::failed(
                id,
                format!("POST webhook {}: HTTP {status} {text}", redact_url(url)),
                is_transient_status(status),
            )
        }
        Err(e) => NoticeOutcome::failed(
            id,
            format!(
                "POST webhook {}: {}",
                redact_url(url),
                if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "cannot connect".to_string()
                } else {
                    e.without_url().to_string()
                }
            ),
            true,
        ),
    }
}

struct Shared {
    outcomes: Mutex<Vec<NoticeOutcome>>,
    in_flight: AtomicUsize,
    notify: Arc<dyn Fn() + Send + Sync>,
}

impl Shared {
    fn push(&self, outcome: NoticeOutcome) {
        if let Ok(mut o) = self.outcomes.lock() {
            o.push(outcome);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        (self.notify)();
    }
}

/// Sends notices on a thread of its own (named `identity_sync notify`); see the module docs.
pub struct Notifier {
    shared: Arc<Shared>,
    tx: Option<mpsc::UnboundedSender<Notice>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the sending thread; `notify` is called from it whenever an outcome is ready.
    /// Signals are blocked in that thread (see [`crate::deliver::Dispatcher::start`]).
    pub fn start(notify: Arc<dyn Fn() + Send + Sync>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            outcomes: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            notify,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("identity_sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(io::Error::other)?;
        let thread_shared = Arc::clone(&shared);
        let thread = crate::deliver::spawn_runtime_thread(
            "identity_sync notify",
            2,
            move || run(thread_shared, client, rx),
            || {},
        )?;
        Ok(Notifier {
            shared,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues notices; returns at once.
    pub fn submit(&self, notices: Vec<Notice>) {
        for n in notices {
            let id = n.id;
            self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let sent = self.tx.as_ref().is_some_and(|tx| tx.send(n).is_ok());
            if !sent {
                self.shared.push(NoticeOutcome::failed(
                    id,
                    "the notification thread is not running",
                    true,
                ));
            }
        }
    }

    /// The outcomes ready so far; never blocks on the network.
    pub fn take_outcomes(&self) -> Vec<NoticeOutcome> {
        self.shared
            .outcomes
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    /// Notices submitted whose outcome is not ready yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; sends in flight are abandoned (their
        // notices are leased and due again later).
        self.tx.take();
        self.thread.take();
    }
}

async fn run(
    shared: Arc<Shared>,
    client: reqwest::Client,
    mut rx: mpsc::UnboundedReceiver<Notice>,
) {
    let mut limits: HashMap<String, Arc<Semaphore>> = HashMap::new();
    while let Some(notice) = rx.recv().await {
        let limit = Arc::clone(
            limits
                .entry(notice.channel.endpoint())
                .or_insert_with(|| Arc::new(Semaphore::new(notice.max_concurrency.clamp(1, 64)))),
        );
        let shared = Arc::clone(&shared);
        let client = client.clone();
        tokio::spawn(async move {
            let outcome = match limit.acquire_owned().await {
                Ok(_permit) => send(&client, &notice).await,
                Err(_) => NoticeOutcome::failed(notice.id, "the notification thread stops", true),
            };
            shared.push(outcome);
        });
    }
}

/// A path given as a rule's `secret_file`.
pub fn secret_file(path: &str) -> Secret {
    Secret::File(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    fn notice(channel: Channel) -> Notice {
        Notice {
            id: 7,
            notification: "hires".into(),
            channel,
            recipient: "boss@example.com".into(),
            subject: "New hire".into(),
            body: "ada.lovelace starts on Monday".into(),
            timeout: Duration::from_secs(5),
            max_concurrency: 2,
        }
    }

    /// A mail channel through the relay at `smtp_url`, without a password.
    fn mail_via(smtp_url: &str) -> Channel {
        Channel::Mail {
            smtp_url: smtp_url.into(),
            from: "idsync@example.com".into(),
            password: None,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A minimal SMTP server: accepts one mail, returns what it received after DATA.
    async fn smtp_once(listener: tokio::net::TcpListener, reply_rcpt: &'static str) -> String {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 test ESMTP\r\n").await.unwrap();
        let mut data = String::new();
        let mut in_data = false;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    w.write_all(b"250 ok queued\r\n").await.unwrap();
                } else {
                    data.push_str(&line);
                }
                continue;
            }
            let cmd = line.to_ascii_uppercase();
            if cmd.starts_with("EHLO") {
                w.write_all(b"250-test\r\n250 8BITMIME\r\n").await.unwrap();
            } else if cmd.starts_with("RCPT") {
                w.write_all(reply_rcpt.as_bytes()).await.unwrap();
            } else if cmd.starts_with("DATA") {
                in_data = true;
                w.write_all(b"354 go\r\n").await.unwrap();
            } else if cmd.starts_with("QUIT") {
                w.write_all(b"221 bye\r\n").await.unwrap();
                break;
            } else {
                w.write_all(b"250 ok\r\n").await.unwrap();
            }
        }
        data
    }

    /// An SMTP relay on a loopback port for one mail (`smtp_once`): its URL and the server.
    async fn relay(reply_rcpt: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(smtp_once(listener, reply_rcpt));
        (format!("smtp://127.0.0.1:{port}"), server)
    }

    /// Sends a mail notice.
    async fn mail(n: &Notice) -> NoticeOutcome {
        send(&reqwest::Client::new(), n).await
    }

    /// A failed outcome's `transient` and `error`; panics on any other.
    fn failure(outcome: NoticeOutcome) -> (bool, String) {
        match outcome {
            NoticeOutcome::Failed {
                transient, error, ..
            } => (transient, error),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mail_reaches_the_relay() {
        rt().block_on(async {
            let (url, server) = relay("250 ok\r\n").await;
            let n = notice(mail_via(&url));
            assert_eq!(mail(&n).await, NoticeOutcome::Sent { id: 7 });
            let data = server.await.unwrap();
            assert!(data.contains("Subject: New hire"), "{data}");
            assert!(data.contains("To: boss@example.com"), "{data}");
            assert!(data.contains("ada.lovelace starts on Monday"), "{data}");
        });
    }

    #[test]
    fn one_recipient_may_name_several_addresses() {
        rt().block_on(async {
            let (url, server) = relay("250 ok\r\n").await;
            let mut n = notice(mail_via(&url));
            n.recipient = "ops@example.com, Oncall <oncall@example.com>".into();
            assert_eq!(mail(&n).await, NoticeOutcome::Sent { id: 7 });
            let data = server.await.unwrap();
            assert!(
                data.contains("To: ops@example.com, Oncall <oncall@example.com>"),
                "{data}"
            );
        });
    }

    #[test]
    fn a_refused_recipient_is_permanent_and_a_closed_port_transient() {
        rt().block_on(async {
            let (url, _server) = relay("550 no such user\r\n").await;
            let (transient, error) = failure(mail(&notice(mail_via(&url))).await);
            assert!(!transient, "{error}");
            assert!(error.contains("no such user"), "{error}");
            // nothing listens there any more
            let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = closed.local_addr().unwrap().port();
            drop(closed);
            let n = notice(mail_via(&format!("smtp://127.0.0.1:{port}")));
            assert!(failure(mail(&n).await).0);
        });
    }

    #[test]
    fn plain_smtp_goes_to_loopback_only_and_bad_addresses_are_permanent() {
        rt().block_on(async {
            let (transient, error) =
                failure(mail(&notice(mail_via("smtp://relay.example.com:25"))).await);
            assert!(!transient);
            assert!(error.contains("loopback"), "{error}");
            let mut n = notice(mail_via("smtp://127.0.0.1:1"));
            n.recipient = "not an address".into();
            assert!(!failure(mail(&n).await).0);
        });
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("smtps://bob:hunter2@relay.example:465"),
            "smtps://bob:***@relay.example:465"
        );
        let c = Channel::Mail {
            smtp_url: "smtps://bob:hunter2@relay.example:465".into(),
            from: "a@b".into(),
            password: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(percent_decode("bob%40corp"), "bob@corp");
    }

    #[test]
    fn a_webhook_is_posted_signed_with_slack_text() {
        rt().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    let n = sock.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                String::from_utf8_lossy(&got).to_string()
            });
            let dir = std::env::temp_dir().join(format!("idsync-notify-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let key = dir.join("key");
            std::fs::write(&key, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
            let n = notice(Channel::Webhook {
                url: format!("http://127.0.0.1:{port}/hook"),
                signing_secret: Some(secret_file(key.to_str().unwrap())),
            });
            let client = reqwest::Client::new();
            assert_eq!(send(&client, &n).await, NoticeOutcome::Sent { id: 7 });
            let request = server.await.unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            assert!(request.contains("webhook-signature: v1,"), "{request}");
            assert!(request.contains("webhook-id: notice_7"), "{request}");
            let body = &request[request.find("\r\n\r\n").unwrap() + 4..];
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["text"], "*New hire*\nada.lovelace starts on Monday");
            assert_eq!(json["recipient"], "boss@example.com");
            // the signature verifies with the key
            let header = request
                .lines()
                .find_map(|l| l.strip_prefix("webhook-signature: "))
                .unwrap();
            let ts: i64 = request
                .lines()
                .find_map(|l| l.strip_prefix("webhook-timestamp: "))
                .unwrap()
                .parse()
                .unwrap();
            let k = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
            assert!(k.verify("notice_7", ts, body.as_bytes(), header));
        });
    }

    #[test]
    fn the_notifier_sends_in_the_background() {
        let rt = rt();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = rt.spawn(smtp_once(listener, "250 ok\r\n"));
        let notifier = Notifier::start(Arc::new(|| {})).unwrap();
        notifier.submit(vec![notice(mail_via(&format!("smtp://127.0.0.1:{port}")))]);
        let data = rt.block_on(server).unwrap();
        assert!(data.contains("Subject: New hire"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while notifier.in_flight() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            notifier.take_outcomes(),
            vec![NoticeOutcome::Sent { id: 7 }]
        );
    }
}
