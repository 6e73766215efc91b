//! The schema-registry client sends the configured username and password
//! as HTTP basic auth: read off a real HTTP request to a one-shot server.

use base64::Engine;
use insights_enricher::events::RegistryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers one request with 404 and returns its `Authorization` header.
async fn one_request_authorization(listener: tokio::net::TcpListener) -> Option<String> {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = br#"{"error_code":40403,"message":"Schema not found"}"#;
    let head = format!(
        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    conn.write_all(body).await.expect("write");
    String::from_utf8_lossy(&buf).lines().find_map(|l| {
        l.split_once(':')
            .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_string())
    })
}

#[tokio::test]
async fn the_registry_username_and_password_are_sent_as_basic_auth() {
    for credentials in [Some(("SRKEY", "REGSECRET:pw")), None] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(one_request_authorization(listener));
        let mut client = RegistryClient::new(&url).expect("client");
        if let Some((user, password)) = credentials {
            client = client.with_basic_auth(user, password);
        }
        let answer = client.schema_by_id(7).await;
        assert!(answer.is_err(), "the server knows no schema");
        let sent = server.await.expect("server");
        let want = credentials.map(|(user, password)| {
            let pair = format!("{user}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        assert_eq!(sent, want);
    }
}
