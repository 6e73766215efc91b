use super::*;
use std::time::Instant;

fn headers(value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
    h
}

#[test]
fn retry_after_accepts_delta_seconds_and_http_dates() {
    let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
    let p = |v: &str| parse_retry_after(&headers(v), now);
    assert_eq!(p("7"), Some(Duration::from_secs(7)));
    assert_eq!(p(" 0 "), Some(Duration::ZERO));
    assert_eq!(p("1.5"), Some(Duration::from_millis(1500)));
    assert_eq!(
        p("Sun, 06 Nov 1994 08:50:07 GMT"),
        Some(Duration::from_secs(30))
    );
    // RFC 850 form, which HTTP still requires recipients to accept.
    assert_eq!(
        p("Sunday, 06-Nov-94 08:49:47 GMT"),
        Some(Duration::from_secs(10))
    );
    assert_eq!(p("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
    assert_eq!(p("soon"), None);
    assert_eq!(p("-3"), None);
    assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn truncate_cuts_on_character_boundaries() {
    assert_eq!(truncate("héllo wörld", 5), "héllo...");
    assert_eq!(truncate(" short ", 50), "short");
}

#[test]
fn json_error_summary_never_quotes_the_input() {
    let e = serde_json::from_str::<Vec<u32>>(r#"["secret sms text"]"#).unwrap_err();
    let s = json_error_summary(&e);
    assert!(!s.contains("secret"), "{s}");
    assert!(s.contains("unexpected shape"), "{s}");
    let e = serde_json::from_str::<serde_json::Value>(r#"{"a": "#).unwrap_err();
    assert!(json_error_summary(&e).starts_with("truncated JSON"));
}

#[test]
fn non_json_summary_names_type_size_and_title() {
    let body = b"<html><head><title>502 Bad Gateway</title></head></html>";
    let s = non_json_summary(Some("text/html"), body);
    assert_eq!(
        s,
        format!(
            "non-JSON body (text/html, {} bytes, title \"502 Bad Gateway\")",
            body.len()
        )
    );
}

#[test]
fn scrub_removes_echoed_secrets() {
    assert_eq!(
        scrub("bad key sk-12345 given", &["sk-12345", ""]),
        "bad key <redacted> given"
    );
}

#[test]
fn non_https_schemes_other_than_http_are_refused() {
    let opts = ClientOptions {
        provider: Provider::Finbox,
        base_url: "ftp://example.com",
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        body_stall_timeout: Duration::from_secs(1),
        min_body_bytes_per_second: 0,
        ca_bundle: None,
    };
    let e = ProviderHttp::new(&opts, opts.base_url)
        .unwrap_err()
        .to_string();
    assert!(e.contains("finbox.base_url"), "{e}");
}

#[test]
fn a_ca_bundle_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate").unwrap();
    let opts = ClientOptions {
        provider: Provider::Credeau,
        base_url: "https://example.com",
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        body_stall_timeout: Duration::from_secs(1),
        min_body_bytes_per_second: 0,
        ca_bundle: Some(&path),
    };
    let e = ProviderHttp::new(&opts, opts.base_url)
        .unwrap_err()
        .to_string();
    assert!(e.contains("credeau.ca_bundle"), "{e}");
}

fn local(timeout: Duration) -> ClientOptions<'static> {
    ClientOptions {
        provider: Provider::Finbox,
        base_url: "http://127.0.0.1:1",
        connect_timeout: Duration::from_secs(2),
        request_timeout: timeout,
        body_stall_timeout: timeout,
        min_body_bytes_per_second: 0,
        ca_bundle: None,
    }
}

/// A server on a real socket that reads one request and writes `answer`
/// in the given pieces, then keeps the connection open.
async fn serve(pieces: Vec<Vec<u8>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = sock.read(&mut buf).await;
        for piece in pieces {
            sock.write_all(&piece).await.unwrap();
            sock.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    format!("http://{addr}/v1/x")
}

async fn post(endpoint: &str, timeout: Duration, cap: usize) -> Result<Bytes, ProviderError> {
    let http = ProviderHttp::new(&local(timeout), endpoint).unwrap();
    let answer = http.post_json(&[], &serde_json::json!({"a": 1})).await?;
    read_capped(Provider::Finbox, answer, cap).await
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_error_naming_the_cause() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/x", listener.local_addr().unwrap());
    drop(listener);
    let e = post(&endpoint, Duration::from_secs(2), 1024)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ProviderErrorKind::Connection, "{e}");
    assert!(e.message.to_lowercase().contains("refused"), "{e}");
    assert!(!e.message.contains("/v1/x"), "{e}");
}

#[tokio::test]
async fn a_body_in_chunks_is_read_whole_and_one_over_the_cap_is_refused() {
    let head =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let pieces = vec![
        head,
        b"5\r\n{\"a\":\r\n".to_vec(),
        b"2\r\n1}\r\n0\r\n\r\n".to_vec(),
    ];
    let body = post(&serve(pieces.clone()).await, Duration::from_secs(5), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"{\"a\":1}");
    let e = post(&serve(pieces).await, Duration::from_secs(5), 6)
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.http_status),
        (ProviderErrorKind::TooLarge, Some(200))
    );
}

#[tokio::test]
async fn a_body_that_stalls_is_a_timeout_after_the_stall_timeout() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"a\":".to_vec();
    let started = Instant::now();
    let e = post(&serve(vec![head]).await, Duration::from_millis(400), 1024)
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind, e.http_status),
        (ProviderErrorKind::Timeout, Some(200)),
        "{e}"
    );
    assert!(e.message.contains("stalled"), "{e}");
    assert!(e.message.contains("400ms"), "{e}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn answer(headers: &str, body: &[u8]) -> Vec<Vec<u8>> {
    let mut head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body);
    vec![head]
}

#[tokio::test]
async fn a_gzip_body_is_decoded_whether_announced_or_not() {
    let json = br#"{"extracted_sms_data": []}"#;
    for headers in ["content-encoding: gzip\r\n", ""] {
        let endpoint = serve(answer(headers, &gzip(json))).await;
        let body = post(&endpoint, Duration::from_secs(5), 1024).await.unwrap();
        assert_eq!(&body[..], json, "{headers:?}");
    }
}

#[tokio::test]
async fn a_gzip_body_over_the_cap_once_decoded_is_too_large() {
    let endpoint = serve(answer(
        "content-encoding: gzip\r\n",
        &gzip(&[b' '; 200_000]),
    ))
    .await;
    let e = post(&endpoint, Duration::from_secs(5), 100_000)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ProviderErrorKind::TooLarge, "{e}");
    assert!(e.message.contains("decoded"), "{e}");
}
