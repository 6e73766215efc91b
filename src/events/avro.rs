//! Avro plumbing shared by input and output: the event schemas compiled into
//! the binary (from `schemas/*.avsc`), the Confluent wire format (magic byte
//! 0, 4-byte big-endian schema id, Avro binary datum), and the few binary
//! encoding primitives the output encoder writes with.
//!
//! Output datums are written directly with these primitives rather than
//! through `apache_avro::Value`: a 5000-SMS extraction would otherwise be
//! copied into a tree of values, validated and walked by field name, which
//! costs an order of magnitude more than writing the bytes. The round-trip
//! tests decode everything written here with apache-avro against the same
//! schemas, so the two cannot drift apart unnoticed.

use std::sync::{LazyLock, Once};

use apache_avro::Schema;

/// The Confluent wire format's magic byte.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus the 4-byte schema id.
pub const WIRE_HEADER_LEN: usize = 5;

/// Which of our schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventSchema {
    UserOnboarded,
    FinboxPredictors,
    SmsExtraction,
    InsightsReady,
}

impl EventSchema {
    pub const ALL: [EventSchema; 4] = [
        EventSchema::UserOnboarded,
        EventSchema::FinboxPredictors,
        EventSchema::SmsExtraction,
        EventSchema::InsightsReady,
    ];

    /// The schema file's name without extension (also the folder name under
    /// `schemas/released/`).
    pub fn file_stem(self) -> &'static str {
        match self {
            EventSchema::UserOnboarded => "user_onboarded",
            EventSchema::FinboxPredictors => "finbox_predictors",
            EventSchema::SmsExtraction => "sms_extraction",
            EventSchema::InsightsReady => "insights_ready",
        }
    }

    /// The `.avsc` text as shipped.
    pub fn text(self) -> &'static str {
        match self {
            EventSchema::UserOnboarded => include_str!("../../schemas/user_onboarded.avsc"),
            EventSchema::FinboxPredictors => include_str!("../../schemas/finbox_predictors.avsc"),
            EventSchema::SmsExtraction => include_str!("../../schemas/sms_extraction.avsc"),
            EventSchema::InsightsReady => include_str!("../../schemas/insights_ready.avsc"),
        }
    }

    /// The parsed schema, parsed once per process.
    pub fn schema(self) -> Result<&'static Schema, SchemaError> {
        static PARSED: LazyLock<[Result<Schema, String>; 4]> = LazyLock::new(|| {
            EventSchema::ALL.map(|s| Schema::parse_str(s.text()).map_err(|e| e.to_string()))
        });
        let index = EventSchema::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or_default();
        PARSED[index].as_ref().map_err(|reason| SchemaError {
            schema: self.file_stem(),
            reason: reason.clone(),
        })
    }
}

/// One of the compiled-in schemas does not parse: a build defect, caught by
/// the tests, reported rather than panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("built-in schema {schema} does not parse: {reason}")]
pub struct SchemaError {
    pub schema: &'static str,
    pub reason: String,
}

/// apache-avro trusts length prefixes up to 512 MiB by default, so a few
/// garbage bytes could make it reserve gigabytes. The cap applies to string
/// and bytes lengths and also to the item count an array or map block
/// declares, which is reserved up front: a map entry takes about 80 bytes
/// and the table rounds up to a power of two, so a 10-byte record naming a
/// writer schema with a map could hold over 1 GiB at a 16 MiB cap (found by
/// tests/fuzz_decoders.rs). At 64 Ki a hostile count costs about 10 MiB.
/// Input events carry ids of at most 260 characters, and neither they nor
/// our own outputs hold a single string or list this long.
pub const AVRO_MAX_ALLOCATION_BYTES: usize = 64 * 1024;

/// Lowers apache-avro's process-wide allocation cap before any untrusted
/// datum is decoded (the library lets it be set once).
pub fn limit_avro_allocations() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        apache_avro::max_allocation_bytes(AVRO_MAX_ALLOCATION_BYTES);
    });
}

/// Splits a Confluent-framed value into schema id and datum. `None` when the
/// magic byte or the id is missing.
pub fn split_wire(value: &[u8]) -> Option<(u32, &[u8])> {
    if value.len() < WIRE_HEADER_LEN || value[0] != MAGIC_BYTE {
        return None;
    }
    let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Some((id, &value[WIRE_HEADER_LEN..]))
}

/// Starts a Confluent-framed value.
pub fn put_wire_header(buf: &mut Vec<u8>, schema_id: u32) {
    buf.push(MAGIC_BYTE);
    buf.extend_from_slice(&schema_id.to_be_bytes());
}

/// Avro `long` (and `int`, and timestamp-millis): zig-zag, then base-128
/// varint, least significant group first.
pub fn put_long(buf: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Largest encoded size of an Avro long.
pub const MAX_LONG_LEN: usize = 10;

pub fn put_int(buf: &mut Vec<u8>, n: i32) {
    put_long(buf, i64::from(n));
}

pub fn put_bool(buf: &mut Vec<u8>, b: bool) {
    buf.push(u8::from(b));
}

pub fn put_double(buf: &mut Vec<u8>, d: f64) {
    buf.extend_from_slice(&d.to_le_bytes());
}

pub fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    put_long(buf, len_i64(bytes.len()));
    buf.extend_from_slice(bytes);
}

pub fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_bytes(buf, s.as_bytes());
}

/// A `["null", T]` union: branch 0 for null, branch 1 then the value.
pub fn put_opt<T>(buf: &mut Vec<u8>, v: Option<T>, put: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => put_long(buf, 0),
        Some(v) => {
            put_long(buf, 1);
            put(buf, v);
        }
    }
}

pub fn put_opt_str(buf: &mut Vec<u8>, v: Option<&str>) {
    put_opt(buf, v, put_str);
}

/// Lengths come from in-memory buffers, far below i64::MAX; saturating keeps
/// this total without a panic path.
pub fn len_i64(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_schema_parses() {
        for s in EventSchema::ALL {
            assert!(s.schema().is_ok(), "{}", s.file_stem());
        }
    }

    #[test]
    fn long_encoding_matches_apache_avro() {
        for n in [0i64, -1, 1, 63, -64, 64, 300, -300, i64::MAX, i64::MIN] {
            let mut mine = Vec::new();
            put_long(&mut mine, n);
            let theirs = apache_avro::to_avro_datum(&Schema::Long, n).unwrap();
            assert_eq!(mine, theirs, "{n}");
            assert!(mine.len() <= MAX_LONG_LEN);
        }
    }

    #[test]
    fn wire_header_round_trips_and_rejects_short_or_unframed_values() {
        let mut buf = Vec::new();
        put_wire_header(&mut buf, 0x0102_0304);
        buf.push(9);
        assert_eq!(split_wire(&buf), Some((0x0102_0304, &[9u8][..])));
        assert_eq!(split_wire(&[0, 0, 0]), None);
        assert_eq!(split_wire(b"{\"a\":1}"), None);
    }
}
