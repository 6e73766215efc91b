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
use hyper::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH};
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
    mut counted: impl FnMut(usize),
) -> Result<Bytes, BodyError> {
    // Where the body gathers: a body that comes in one frame is kept as
    // that frame, without a copy; a longer one is copied frame by frame
    // into one buffer sized from its Content-Length, so a 30 MB answer is
    // held once while it arrives, not as its frames and then their copy.
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|len| len.min(limits.max_bytes));
    let mut body_so_far = Gathered::Empty;
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
                counted(data.len());
                body_so_far.push(data, announced.unwrap_or(0));
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
    let raw = body_so_far.into_bytes();
    if is_gzip(headers, &raw) {
        let decoded = gunzip(&raw, limits.max_bytes)?;
        counted(decoded.len().saturating_sub(raw.len()));
        Ok(decoded)
    } else {
        Ok(raw)
    }
}

/// A body's bytes as they arrive.
enum Gathered {
    Empty,
    /// The first frame, uncopied.
    One(Bytes),
    /// Two frames or more, copied into one buffer.
    Many(Vec<u8>),
}

impl Gathered {
    /// Adds a frame; `announced` is the Content-Length (0: none), the
    /// buffer's size when a second frame comes.
    fn push(&mut self, data: Bytes, announced: usize) {
        match self {
            Gathered::Empty => *self = Gathered::One(data),
            Gathered::One(first) => {
                let mut whole = Vec::with_capacity(announced.max(first.len() + data.len()));
                whole.extend_from_slice(first);
                whole.extend_from_slice(&data);
                *self = Gathered::Many(whole);
            }
            Gathered::Many(whole) => whole.extend_from_slice(&data),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Gathered::Empty => Bytes::new(),
            Gathered::One(b) => b,
            Gathered::Many(v) => Bytes::from(v),
        }
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
    fn one_frame_is_kept_uncopied_and_more_are_gathered_into_one_buffer() {
        let frame = Bytes::from_static(b"{\"a\":1}");
        let mut one = Gathered::Empty;
        one.push(frame.clone(), 0);
        let kept = one.into_bytes();
        assert_eq!(kept.as_ptr(), frame.as_ptr(), "the single frame was copied");

        let mut many = Gathered::Empty;
        for part in [&b"{\"a\""[..], b":", b"1}"] {
            many.push(Bytes::copy_from_slice(part), 100);
        }
        match &many {
            Gathered::Many(v) => assert!(v.capacity() >= 100, "{}", v.capacity()),
            _ => panic!("three frames not gathered into one buffer"),
        }
        assert_eq!(&many.into_bytes()[..], b"{\"a\":1}");
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
