//! TLS: certificates are verified by default, and a target's `ca_file` makes a private CA
//! trusted. A local HTTPS server presents a certificate for 127.0.0.1 signed by a CA made in
//! the test.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::{job, Harness};
use identity_sync_core::deliver::{EventKind, Outcome, TargetConfig, TargetKind};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// A CA's certificate (PEM) and an HTTPS server on 127.0.0.1 with a certificate it signed;
/// the server answers every request `200 {}` and runs until the test process ends.
fn https_server() -> (String, u16) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust us fails the handshake: nothing to answer.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 16384];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    });
    (ca.pem(), port)
}

fn target(port: u16, ca_file: Option<std::path::PathBuf>) -> TargetConfig {
    TargetConfig {
        id: 1,
        name: "tls".into(),
        kind: TargetKind::Webhook,
        url: format!("https://127.0.0.1:{port}/hook"),
        timeout: std::time::Duration::from_secs(5),
        max_concurrency: 2,
        ca_file,
        ..TargetConfig::default()
    }
}

#[test]
fn certificates_are_verified_and_ca_file_trusts_a_private_ca() {
    let (ca_pem, port) = https_server();

    // Not trusted: the public roots do not know our CA.
    let h = Harness::start(vec![target(port, None)]);
    match h.one(job(1, 1, "p1", EventKind::Create)) {
        Outcome::Retry { error, .. } => {
            assert!(error.to_lowercase().contains("certificate"), "{error}")
        }
        other => panic!("an untrusted certificate was accepted: {other:?}"),
    }

    // Trusted through ca_file.
    let dir = std::env::temp_dir().join(format!("identity_sync-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::File::create(&ca_file)
        .unwrap()
        .write_all(ca_pem.as_bytes())
        .unwrap();
    let h = Harness::start(vec![target(port, Some(ca_file.clone()))]);
    assert!(
        matches!(
            h.one(job(2, 1, "p2", EventKind::Create)),
            Outcome::Done { .. }
        ),
        "a certificate signed by ca_file's CA was refused"
    );

    // A ca_file that is not a certificate: a clear, permanent error.
    let bad = dir.join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let h = Harness::start(vec![target(port, Some(bad))]);
    match h.one(job(3, 1, "p3", EventKind::Create)) {
        Outcome::Failed { error, .. } => assert!(error.contains("ca_file"), "{error}"),
        other => panic!("a broken ca_file was not reported: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_http_to_a_remote_host_is_refused_before_sending() {
    let mut t = target(1, None);
    t.url = "http://far.invalid/hook".into();
    let h = Harness::start(vec![t]);
    match h.one(job(1, 1, "p1", EventKind::Create)) {
        Outcome::Failed { error, .. } => {
            assert!(error.contains("allow_insecure_http"), "{error}")
        }
        other => panic!("plain http to a remote host was not refused: {other:?}"),
    }
}
