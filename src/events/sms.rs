//! The SMS extraction event: mapping Credeau's open-ended entries onto the
//! typed `SmsEntry` record (unknown or oddly typed fields go to `extra` as
//! JSON text, never dropped), and splitting the entries into numbered parts
//! so every encoded value fits the producer's size limit.
//!
//! Each entry is encoded once (as JSON it is Credeau's text as sent),
//! straight into its part: parts are filled greedily in order, and a part
//! is its header, a run of entries and its trailer. The header is sized
//! with its integers at their widest, so a part never exceeds the limit
//! whatever numbers it ends up carrying.

use serde_json::{Map, Value};

use super::avro::{self, put_bool, put_bytes, put_double, put_int, put_long, put_str};
use super::encode_error::EncodeError;
use crate::providers::SmsEntry;
use crate::task::Millis;

/// An entry's fields, read for the Avro record.
type Entry = Map<String, Value>;

pub(crate) struct SmsHeader<'a> {
    pub event_id: &'a str,
    pub user_id: &'a str,
    pub credeau_user_id: &'a str,
    pub onboarded_at: Millis,
    pub fetched_at: Millis,
    pub cnt_sms_threshold: Option<u32>,
    pub data_problem: Option<&'a str>,
    pub response_json: Option<&'a str>,
}

/// The key under which an entry that is not standard JSON (a lone
/// surrogate escape, a number beyond double range) keeps its text exactly
/// as Credeau sent it, in the Avro entry's `extra`; its typed fields are
/// read from the repaired text (see `providers::lenient_json`).
pub const ENTRY_AS_SENT_KEY: &str = "_entry_json";

/// One entry's fields for the Avro record. An entry Avro's types cannot
/// hold as sent is read leniently, and its original text kept in `extra`,
/// so one odd value never loses the extraction.
fn entry_fields(text: &str) -> Result<Entry, EncodeError> {
    let strict = match serde_json::from_str::<Entry>(text) {
        Ok(fields) => return Ok(fields),
        Err(e) => e,
    };
    let repaired = crate::providers::lenient_json::repair(text.as_bytes())
        .map_err(|u| EncodeError::Json(format!("an SMS entry is not JSON text: {u}")))?;
    let mut fields: Entry = serde_json::from_str(&repaired.text).map_err(|_| {
        EncodeError::Json(format!(
            "an SMS entry cannot be read even leniently (line {}, column {})",
            strict.line(),
            strict.column()
        ))
    })?;
    fields.insert(ENTRY_AS_SENT_KEY.to_owned(), Value::String(text.to_owned()));
    Ok(fields)
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Double,
}

/// The typed `SmsEntry` fields in schema order: (Credeau's key, kind).
/// Credeau's `_id` is published as `id`.
const TYPED: [(&str, Kind); 25] = [
    ("_id", Kind::Str),
    ("sms_id", Kind::Str),
    ("sms_sender", Kind::Str),
    ("sms_inbox_date", Kind::Str),
    ("sms_body", Kind::Str),
    ("created_at", Kind::Str),
    ("created_date", Kind::Str),
    ("template_hash", Kind::Str),
    ("is_classified", Kind::Bool),
    ("is_extracted", Kind::Bool),
    ("account_last_digits", Kind::Str),
    ("transaction", Kind::Double),
    ("transaction_party", Kind::Str),
    ("sms_sub_type", Kind::Str),
    ("sms_type", Kind::Str),
    ("sender_name", Kind::Str),
    ("sender_type", Kind::Str),
    ("sms_nlp_tag", Kind::Str),
    ("unique_pan", Kind::Str),
    ("is_transactional", Kind::Bool),
    ("transaction_type", Kind::Str),
    ("acc_number_nlp", Kind::Str),
    ("transaction_nlp", Kind::Double),
    ("unique_pan_nlp", Kind::Str),
    ("request_id", Kind::Str),
];

/// Index into [`TYPED`]; a `match` rather than a scan, since it runs for
/// every field of every entry.
fn typed_slot(key: &str) -> Option<usize> {
    match key {
        "_id" => Some(0),
        "sms_id" => Some(1),
        "sms_sender" => Some(2),
        "sms_inbox_date" => Some(3),
        "sms_body" => Some(4),
        "created_at" => Some(5),
        "created_date" => Some(6),
        "template_hash" => Some(7),
        "is_classified" => Some(8),
        "is_extracted" => Some(9),
        "account_last_digits" => Some(10),
        "transaction" => Some(11),
        "transaction_party" => Some(12),
        "sms_sub_type" => Some(13),
        "sms_type" => Some(14),
        "sender_name" => Some(15),
        "sender_type" => Some(16),
        "sms_nlp_tag" => Some(17),
        "unique_pan" => Some(18),
        "is_transactional" => Some(19),
        "transaction_type" => Some(20),
        "acc_number_nlp" => Some(21),
        "transaction_nlp" => Some(22),
        "unique_pan_nlp" => Some(23),
        "request_id" => Some(24),
        _ => None,
    }
}

fn fits(kind: Kind, v: &Value) -> bool {
    match kind {
        Kind::Str => v.is_string(),
        Kind::Bool => v.is_boolean(),
        Kind::Double => v.is_number(),
    }
}

/// Appends one `SmsEntry` datum. `extras` and `scratch` are reused across
/// entries to avoid an allocation per entry.
fn put_entry<'e>(
    buf: &mut Vec<u8>,
    entry: &'e Entry,
    extras: &mut Vec<(&'e str, &'e Value)>,
    scratch: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let mut slots: [Option<&Value>; TYPED.len()] = [None; TYPED.len()];
    extras.clear();
    for (k, v) in entry {
        match typed_slot(k) {
            Some(i) if v.is_null() => slots[i] = None,
            Some(i) if fits(TYPED[i].1, v) => slots[i] = Some(v),
            _ => extras.push((k, v)),
        }
    }
    for (slot, (_, kind)) in slots.iter().zip(TYPED) {
        let Some(v) = slot else {
            put_long(buf, 0);
            continue;
        };
        put_long(buf, 1);
        match kind {
            Kind::Str => put_str(buf, v.as_str().unwrap_or_default()),
            Kind::Bool => put_bool(buf, v.as_bool().unwrap_or_default()),
            Kind::Double => put_double(buf, v.as_f64().unwrap_or_default()),
        }
    }
    if !extras.is_empty() {
        put_long(buf, avro::len_i64(extras.len()));
        for (k, v) in extras.iter() {
            put_str(buf, k);
            scratch.clear();
            serde_json::to_writer(&mut *scratch, v)?;
            put_bytes(buf, scratch);
        }
    }
    put_long(buf, 0);
    Ok(())
}

/// Groups entries into parts of at most `budget` bytes each, in order and
/// greedily, given each entry's cost as it comes (its encoded bytes plus
/// any separator).
struct Packer {
    budget: usize,
    max: usize,
    start: usize,
    used: usize,
    parts: Vec<std::ops::Range<usize>>,
}

impl Packer {
    fn new(budget: usize, max: usize) -> Packer {
        Packer {
            budget,
            max,
            start: 0,
            used: 0,
            parts: Vec::new(),
        }
    }

    /// Adds entry `i` of `size` bytes; true when it begins a new part.
    fn add(&mut self, i: usize, size: usize) -> Result<bool, EncodeError> {
        if size > self.budget {
            return Err(EncodeError::TooLarge {
                entry: Some(i),
                size,
                max: self.max,
            });
        }
        let new_part = self.used + size > self.budget;
        if new_part {
            self.parts.push(self.start..i);
            self.start = i;
            self.used = 0;
        }
        self.used += size;
        Ok(new_part)
    }

    /// The index ranges of the parts of `n` entries (one empty part for
    /// none).
    fn finish(mut self, n: usize) -> Vec<std::ops::Range<usize>> {
        self.parts.push(self.start..n);
        self.parts
    }
}

fn budget(overhead: usize, max: usize) -> Result<usize, EncodeError> {
    max.checked_sub(overhead)
        .filter(|b| *b > 0)
        .ok_or(EncodeError::TooLarge {
            entry: None,
            size: overhead,
            max,
        })
}

fn count_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn count_i32_u32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub(crate) fn encode_avro(
    h: &SmsHeader<'_>,
    entries: &[SmsEntry],
    schema_id: u32,
    max: usize,
) -> Result<Vec<Vec<u8>>, EncodeError> {
    let put_header = |buf: &mut Vec<u8>, part: i32, parts: i32, total: i32| {
        avro::put_wire_header(buf, schema_id);
        put_str(buf, h.event_id);
        put_str(buf, h.user_id);
        put_str(buf, h.credeau_user_id);
        put_long(buf, h.onboarded_at);
        put_long(buf, h.fetched_at);
        put_int(buf, part);
        put_int(buf, parts);
        put_int(buf, total);
    };
    let threshold = h.cnt_sms_threshold.map(count_i32_u32);
    let put_trailer = |buf: &mut Vec<u8>| {
        avro::put_opt(buf, threshold, put_int);
        avro::put_opt_str(buf, h.data_problem);
        avro::put_opt_str(buf, h.response_json);
    };
    let mut widest = Vec::new();
    put_header(&mut widest, i32::MAX, i32::MAX, i32::MAX);
    put_trailer(&mut widest);
    // Plus the array's block count and its terminating zero.
    let overhead = widest.len() + avro::MAX_LONG_LEN + 1;
    // Each entry is encoded once, straight into its part's run of entry
    // bytes; a part is then its header, that run and its trailer. So an
    // answer is held twice at most (its entries and the parts), not a
    // third time as one buffer of every encoded entry.
    let mut packer = Packer::new(budget(overhead, max)?, max);
    let mut runs: Vec<Vec<u8>> = Vec::new();
    let mut run = Vec::new();
    let mut scratch = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let fields = entry_fields(e.get())?;
        let mut extras = Vec::new();
        let at = run.len();
        put_entry(&mut run, &fields, &mut extras, &mut scratch)?;
        if packer.add(i, run.len() - at)? {
            let this = run.split_off(at);
            runs.push(std::mem::replace(&mut run, this));
        }
    }
    runs.push(run);
    let plan = packer.finish(entries.len());
    let parts = count_i32(plan.len());
    let total = count_i32(entries.len());
    let mut out = Vec::with_capacity(plan.len());
    for (n, (range, bytes)) in plan.into_iter().zip(runs).enumerate() {
        let mut buf = Vec::with_capacity(overhead + bytes.len());
        put_header(&mut buf, count_i32(n + 1), parts, total);
        if !range.is_empty() {
            put_long(&mut buf, avro::len_i64(range.len()));
            buf.extend_from_slice(&bytes);
        }
        drop(bytes);
        put_long(&mut buf, 0);
        put_trailer(&mut buf);
        out.push(buf);
    }
    Ok(out)
}

pub(crate) fn encode_json(
    h: &SmsHeader<'_>,
    entries: &[SmsEntry],
    max: usize,
) -> Result<Vec<Vec<u8>>, EncodeError> {
    let put_header = |buf: &mut Vec<u8>, part: i32, parts: i32, total: i32| {
        // Field by field rather than through a struct, so the entries can
        // be appended afterwards as already-encoded bytes.
        let fields: [(&str, &dyn erased::Field); 8] = [
            ("event_id", &h.event_id),
            ("user_id", &h.user_id),
            ("credeau_user_id", &h.credeau_user_id),
            ("onboarded_at", &h.onboarded_at),
            ("fetched_at", &h.fetched_at),
            ("part", &part),
            ("parts", &parts),
            ("total_sms", &total),
        ];
        buf.push(b'{');
        for (name, value) in fields {
            buf.push(b'"');
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\":");
            value.write_json(buf);
            buf.push(b',');
        }
        buf.extend_from_slice(b"\"entries\":[");
    };
    // After the entries: `],"cnt_sms_threshold":N,...}` (null when unknown).
    let trailer = format!(
        "],\"cnt_sms_threshold\":{},\"data_problem\":{},\"response_json\":{}}}",
        h.cnt_sms_threshold
            .map_or_else(|| "null".to_string(), |t| t.to_string()),
        serde_json::to_string(&h.data_problem)?,
        serde_json::to_string(&h.response_json)?,
    );
    let mut widest = Vec::new();
    put_header(&mut widest, i32::MAX, i32::MAX, i32::MAX);
    let overhead = widest.len() + trailer.len();
    // Each entry goes into its part as Credeau sent it (a JSON object
    // already), and costs its bytes plus at most one separating comma.
    let mut packer = Packer::new(budget(overhead, max)?, max);
    for (i, e) in entries.iter().enumerate() {
        packer.add(i, e.get().len() + 1)?;
    }
    let plan = packer.finish(entries.len());
    let parts = count_i32(plan.len());
    let total = count_i32(entries.len());
    let mut out = Vec::with_capacity(plan.len());
    for (n, range) in plan.into_iter().enumerate() {
        let run = &entries[range];
        let run_bytes: usize = run.iter().map(|e| e.get().len() + 1).sum();
        let mut buf = Vec::with_capacity(overhead + run_bytes);
        put_header(&mut buf, count_i32(n + 1), parts, total);
        for (k, e) in run.iter().enumerate() {
            if k > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(e.get().as_bytes());
        }
        buf.extend_from_slice(trailer.as_bytes());
        out.push(buf);
    }
    Ok(out)
}

/// The two kinds of header value, written as JSON without a fallible
/// serializer call.
mod erased {
    pub trait Field {
        fn write_json(&self, buf: &mut Vec<u8>);
    }
    impl Field for &str {
        fn write_json(&self, buf: &mut Vec<u8>) {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, self);
        }
    }
    impl Field for i64 {
        fn write_json(&self, buf: &mut Vec<u8>) {
            buf.extend_from_slice(self.to_string().as_bytes());
        }
    }
    impl Field for i32 {
        fn write_json(&self, buf: &mut Vec<u8>) {
            buf.extend_from_slice(self.to_string().as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_parts(
        sizes: &[usize],
        budget: usize,
        max: usize,
    ) -> Result<Vec<std::ops::Range<usize>>, EncodeError> {
        let mut packer = Packer::new(budget, max);
        for (i, size) in sizes.iter().enumerate() {
            packer.add(i, *size)?;
        }
        Ok(packer.finish(sizes.len()))
    }

    #[test]
    fn slot_lookup_agrees_with_the_typed_table() {
        for (i, (k, _)) in TYPED.iter().enumerate() {
            assert_eq!(typed_slot(k), Some(i), "{k}");
        }
        assert_eq!(typed_slot("id"), None);
    }

    #[test]
    fn parts_are_filled_greedily_in_order() {
        let plan = plan_parts(&[4, 4, 4, 9, 1], 10, 100).unwrap();
        assert_eq!(plan, vec![0..2, 2..3, 3..5]);
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_too_large() {
        let err = plan_parts(&[4, 11], 10, 100).unwrap_err();
        assert!(matches!(
            err,
            EncodeError::TooLarge {
                entry: Some(1),
                size: 11,
                ..
            }
        ));
    }

    #[test]
    fn no_entries_give_one_empty_part() {
        assert_eq!(plan_parts(&[], 10, 100).unwrap(), vec![0..0]);
    }

    #[test]
    fn typed_fields_with_unexpected_types_go_to_extra() {
        let entry: Entry = serde_json::from_value(serde_json::json!({
            "_id": "a", "transaction": "eighty", "is_extracted": true, "new_field": [1]
        }))
        .unwrap();
        let (mut extras, mut scratch, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        put_entry(&mut buf, &entry, &mut extras, &mut scratch).unwrap();
        let mut keys: Vec<&str> = extras.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec!["new_field", "transaction"]);
    }
}
