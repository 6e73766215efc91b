//! The schema registry's username and password are sent as HTTP basic auth,
//! read off real HTTP requests to a registry stand-in that records them:
//! from the client directly, and from the service started with Avro output
//! and the password in a file (as the chart mounts it), against the real
//! broker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::*;
use insights_enricher::events::RegistryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A registry stand-in that answers every request 401 and records each
/// request's `Authorization` header (`None` when there was none).
async fn recording_registry() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let header = String::from_utf8_lossy(&buf).lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"))
                    .map(|(_, v)| v.trim().to_string())
            });
            record.lock().expect("lock").push(header);
            let body = br#"{"error_code":401,"message":"Unauthorized"}"#;
            let head = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body).await;
        }
    });
    (url, seen)
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test]
async fn the_client_sends_the_username_and_password_as_basic_auth() {
    let (url, seen) = recording_registry().await;
    let client = RegistryClient::new(&url).expect("client");
    assert!(client.schema_by_id(7).await.is_err());
    let client = client.with_basic_auth("SRKEY", "REGSECRET:pw");
    assert!(client.schema_by_id(8).await.is_err());
    assert_eq!(
        *seen.lock().expect("lock"),
        [None, Some(basic("SRKEY", "REGSECRET:pw"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_sends_the_configured_registry_credentials() {
    const PASSWORD: &str = "REGSECRETservice6b0e";
    let (url, seen) = recording_registry().await;
    let topics = Topics::new("registry-auth");
    let dir = tempfile::tempdir().expect("tempdir");
    let password_file = dir.path().join("schema-registry-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write");
    let mut env = service_env(&topics, &unique("g"), "http://127.0.0.1:1");
    env.extend(
        [
            ("INSIGHTS__ENCODING__OUTPUT", "avro"),
            ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL", url.as_str()),
            ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME", "SRKEY"),
            (
                "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD_FILE",
                password_file.to_str().expect("utf-8 path"),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let log = dir.path().join("service.log");
    let mut service = Service::start(&env, &log);
    // The service registers its output schemas while it starts.
    let first = eventually(Duration::from_secs(60), || {
        seen.lock().expect("lock").first().cloned()
    })
    .await;
    service.kill();
    assert_eq!(first, Some(Some(basic("SRKEY", PASSWORD))));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains(PASSWORD), "{text}");
}
