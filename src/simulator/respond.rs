//! Building HTTP answers: JSON and HTML bodies, the pages the providers'
//! front proxies send, provider timestamps, and the mangled answers that
//! faults produce (dropped connections, truncated JSON).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;

use super::faults::Fault;
use super::scenario::Faults;

/// Credeau's 403 page (IP not whitelisted, or a wrong path), as in its document.
pub const FORBIDDEN_HTML: &str = "<html>\n    <head><title>403 Forbidden</title></head>\n    <body>\n        <center><h1>403 Forbidden</h1></center>\n    </body>\n</html>\n";

/// What an nginx in front of an upstream that is down sends.
pub const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// A 200 page that is not JSON: a captive portal or maintenance page.
pub const MAINTENANCE_HTML: &str = "<!DOCTYPE html>\n<html><head><title>Scheduled maintenance</title></head>\n<body><h1>We'll be back soon</h1><p>The service is undergoing scheduled maintenance.</p></body></html>\n";

/// Marks a response whose connection the server abandons mid-way, so the
/// statistics can count it as dropped.
#[derive(Debug, Clone, Copy)]
pub struct Dropped;

pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    // Serializing a `Value` into memory cannot fail: its keys are strings.
    json_bytes(status, serde_json::to_vec(value).unwrap_or_default())
}

pub fn html(status: StatusCode, page: &'static str) -> Response {
    let mut resp = Response::new(Body::from(page));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

pub fn forbidden_html() -> Response {
    html(StatusCode::FORBIDDEN, FORBIDDEN_HTML)
}

pub fn with_retry_after(mut resp: Response, secs: Option<u64>) -> Response {
    if let Some(secs) = secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Sends the status line, headers and part of `body`, then fails the body
/// stream: the server closes the connection and the client sees an
/// incomplete response.
pub fn dropped(body: &[u8]) -> Response {
    let head = Bytes::copy_from_slice(&body[..body.len() / 2]);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(head),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated connection drop",
        )),
    ];
    let stream = futures::stream::iter(chunks);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.extensions_mut().insert(Dropped);
    resp
}

/// `application/json` with `body` sent as the faults shape it:
/// gzip-compressed, at a rate, stalling after some bytes.
pub fn shaped_json(status: StatusCode, body: Vec<u8>, faults: &Faults) -> Response {
    use std::io::Write as _;
    let gzip = faults.gzip;
    let body = if gzip {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into memory cannot fail.
        let _ = e.write_all(&body);
        e.finish().unwrap_or_default()
    } else {
        body
    };
    let mut resp = if faults.body_bytes_per_second == 0 && faults.body_stall_after_bytes.is_none() {
        json_bytes(status, body)
    } else {
        let sent = faults.body_stall_after_bytes.map_or(body.len(), |n| {
            usize::try_from(n).unwrap_or(usize::MAX).min(body.len())
        });
        let stalls = sent < body.len() || faults.body_stall_after_bytes.is_some();
        let piece = match faults.body_bytes_per_second {
            0 => body.len().max(1),
            rate => usize::try_from(rate / 10).unwrap_or(usize::MAX).max(1),
        };
        let paced = faults.body_bytes_per_second > 0;
        let body = Bytes::from(body);
        let stream = futures::stream::unfold(0usize, move |at| {
            let body = body.clone();
            async move {
                if at >= sent {
                    if stalls {
                        // Hold the connection open, sending nothing more.
                        std::future::pending::<()>().await;
                    }
                    return None;
                }
                if paced && at > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let end = (at + piece).min(sent);
                Some((Ok::<_, std::io::Error>(body.slice(at..end)), end))
            }
        });
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    };
    if gzip {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

/// 200 `application/json` whose body is the first half of `body`.
pub fn truncated(body: &[u8]) -> Response {
    json_bytes(StatusCode::OK, body[..body.len() / 2].to_vec())
}

/// A scripted answer (see `ScriptedAnswer`) for a request about `id`.
pub fn scripted(answer: &super::scenario::ScriptedAnswer, id: &str) -> Response {
    let mut resp = Response::new(Body::from(answer.body_bytes(id)));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    if let Ok(ct) = HeaderValue::from_str(&answer.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    with_retry_after(resp, answer.retry_after_secs)
}

/// Renders a fault. `real_body` is the answer the request would have got
/// (dropped and truncated answers are cut from it); server errors and rate
/// limits use the provider's own bodies.
pub fn render_fault(
    fault: Fault,
    real_body: Vec<u8>,
    server_error: impl FnOnce(StatusCode) -> Response,
    rate_limited: impl FnOnce(Option<u64>) -> Response,
) -> Response {
    match fault {
        Fault::Drop => dropped(&real_body),
        Fault::ProxyHtml => html(StatusCode::BAD_GATEWAY, BAD_GATEWAY_HTML),
        Fault::NonJson => html(StatusCode::OK, MAINTENANCE_HTML),
        Fault::TruncatedJson => truncated(&real_body),
        Fault::ServerError { status } => {
            server_error(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE))
        }
        Fault::RateLimit { retry_after_secs } => rate_limited(retry_after_secs),
    }
}

/// FinBox's timestamp format, `YYYY-MM-DDThh:mm:ss:mil` (UTC).
pub fn finbox_timestamp(unix_ms: u64) -> String {
    format_unix_ms(unix_ms, "%Y-%m-%dT%H:%M:%S:%3f")
}

/// Credeau's timestamp format, `YYYY-MM-DD hh:mm:ss` (UTC).
pub fn credeau_timestamp(unix_ms: u64) -> String {
    format_unix_ms(unix_ms, "%Y-%m-%d %H:%M:%S")
}

fn format_unix_ms(unix_ms: u64, fmt: &str) -> String {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format(fmt)
        .to_string()
}

/// Whole seconds a client should wait, never 0 (a `Retry-After: 0` would
/// invite an immediate retry that fails again).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finbox_timestamps_put_a_colon_before_milliseconds() {
        assert_eq!(
            finbox_timestamp(1_546_497_464_003),
            "2019-01-03T06:37:44:003"
        );
        assert_eq!(credeau_timestamp(1_546_497_464_003), "2019-01-03 06:37:44");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
