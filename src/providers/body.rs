//! Reading an answer's body: as long as it keeps arriving, cut only when it
//! stalls (no byte for a while, or under a bytes-per-second floor), capped
//! in size before and after gzip decoding.
//!
//! Why no overall deadline: a healthy 30 MB answer at 500 KB/s takes a
//! minute, and cutting it at any fixed time only means downloading it
//! again on the next poll. What is wrong is a body that stops, and that is
//! what is cut. A gzip body is decoded whether or not its headers say so
//! (the magic bytes tell; JSON never starts with them), and the decoded
//! size is capped too, so a small compressed body cannot expand without
//! bound.

use std::io::Read as _;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_ENCODING};
use tokio::time::Instant;

/// When a body is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// The most bytes read, on the wire and decoded alike.
    pub max_bytes: usize,
    /// No byte for this long: stalled. Also the span over which the rate
    /// is measured.
    pub stall_timeout: Duration,
    /// Fewer bytes than this per second over a `stall_timeout`: stalled.
    pub min_bytes_per_second: u64,
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over `max_bytes` (`decoded`: after gzip decoding).
    TooLarge { decoded: bool },
    /// The body stopped arriving, or arrived under the floor.
    Stalled(String),
    /// The connection failed mid-body.
    Transport(hyper::Error),
    /// Said or looked like gzip, and is not.
    BadGzip(String),
}

/// The first bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads the whole body (see the module documentation), decoded.
pub(crate) async fn read(
    headers: &HeaderMap,
    mut body: Incoming,
    limits: BodyLimits,
) -> Result<Bytes, BodyError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    loop {
        let frame = match tokio::time::timeout(limits.stall_timeout, body.frame()).await {
            Err(_) => {
                return Err(BodyError::Stalled(format!(
                    "answer body stalled: no byte for {} after {total} bytes",
                    humantime::format_duration(limits.stall_timeout)
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Transport(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total > limits.max_bytes {
                return Err(BodyError::TooLarge { decoded: false });
            }
            window_bytes += data.len() as u64;
            if !data.is_empty() {
                chunks.push(data);
            }
        }
        let spent = window_start.elapsed();
        if spent >= limits.stall_timeout {
            let rate = (window_bytes as f64 / spent.as_secs_f64()) as u64;
            if rate < limits.min_bytes_per_second {
                return Err(BodyError::Stalled(format!(
                    "answer body arriving at {rate} bytes/s, under the {} bytes/s floor, after {total} bytes",
                    limits.min_bytes_per_second
                )));
            }
            window_start = Instant::now();
            window_bytes = 0;
        }
    }
    let raw = match chunks.len() {
        0 => Bytes::new(),
        // A body that came in one piece is handed back without a copy.
        1 => chunks.swap_remove(0),
        _ => {
            let mut whole = Vec::with_capacity(total);
            for c in &chunks {
                whole.extend_from_slice(c);
            }
            Bytes::from(whole)
        }
    };
    if is_gzip(headers, &raw) {
        gunzip(&raw, limits.max_bytes)
    } else {
        Ok(raw)
    }
}

/// Whether the body is gzip: said so, or starts like it.
fn is_gzip(headers: &HeaderMap, raw: &[u8]) -> bool {
    let said = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "gzip" | "x-gzip"));
    said || raw.starts_with(&GZIP_MAGIC)
}

/// Decodes gzip (one or more members), reading at most `max_bytes + 1`
/// decoded bytes.
fn gunzip(raw: &[u8], max_bytes: usize) -> Result<Bytes, BodyError> {
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(max_bytes));
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::BadGzip(e.to_string()))?;
    if out.len() > max_bytes {
        return Err(BodyError::TooLarge { decoded: true });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_is_known_by_its_header_or_its_magic_bytes() {
        let mut h = HeaderMap::new();
        assert!(!is_gzip(&h, b"{\"a\":1}"));
        assert!(is_gzip(&h, &gzip(b"{}")));
        h.insert(CONTENT_ENCODING, "identity, GZIP".parse().unwrap());
        assert!(is_gzip(&h, b"whatever"));
    }

    #[test]
    fn a_gzip_bomb_is_refused_at_the_decoded_cap() {
        let bomb = gzip(&vec![b' '; 10 << 20]);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert!(matches!(
            gunzip(&bomb, 1 << 20),
            Err(BodyError::TooLarge { decoded: true })
        ));
        assert_eq!(gunzip(&bomb, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn a_body_that_only_looks_like_gzip_is_refused() {
        assert!(matches!(
            gunzip(&[0x1f, 0x8b, 1, 2, 3], 1024),
            Err(BodyError::BadGzip(_))
        ));
    }
}
