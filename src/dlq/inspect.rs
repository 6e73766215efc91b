//! `insights-enricher dlq inspect`: counts of dead letters by reason,
//! provider, HTTP status and stage, and the records themselves with their
//! headers, as text for people or JSON for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dlq::read::DlqRecord;
use crate::events::dead_letter::headers as h;
use crate::printable::{printable, printable_str, Lines};
use crate::task::Task;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub total: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub by_provider: BTreeMap<String, usize>,
    pub by_http_status: BTreeMap<String, usize>,
    pub by_stage: BTreeMap<String, usize>,
}

pub fn summarize(records: &[DlqRecord]) -> Summary {
    let mut s = Summary {
        total: records.len(),
        ..Default::default()
    };
    for r in records {
        let get = |k: &str| r.header(k).unwrap_or("-").to_string();
        *s.by_reason.entry(get(h::ERROR_CLASS)).or_default() += 1;
        *s.by_provider.entry(get(h::PROVIDER)).or_default() += 1;
        *s.by_http_status.entry(get(h::HTTP_STATUS)).or_default() += 1;
        *s.by_stage.entry(get(h::STAGE)).or_default() += 1;
    }
    s
}

/// A record as shown: headers plus its value (a task's identity and
/// outcomes, since a task may carry SMS data; an input event as it is:
/// JSON as JSON, other text as text, anything else as Base64), and its
/// times in RFC 3339.
#[derive(Debug, Serialize)]
pub struct Shown<'a> {
    #[serde(flatten)]
    pub record: &'a DlqRecord,
    /// The record's Kafka timestamp.
    pub time: Option<String>,
    /// `dlq.failed_at`.
    pub failed_at: Option<String>,
    pub value: serde_json::Value,
}

/// Values longer than this are cut (at a character boundary) when shown.
pub const SHOWN_VALUE_BYTES: usize = 64 * 1024;

/// Epoch milliseconds as an RFC 3339 time (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Headers that hold epoch milliseconds.
fn is_time_header(k: &str) -> bool {
    k == h::FAILED_AT || k == h::ORIGINAL_TIMESTAMP
}

/// A header's value for people: times in RFC 3339, the rest on one line
/// with control characters escaped.
fn header_text(k: &str, v: &str) -> String {
    if is_time_header(k) {
        if let Some(t) = v.parse::<i64>().ok().and_then(rfc3339) {
            return t;
        }
    }
    printable_str(v, Lines::One)
}

fn raw_value(v: &[u8]) -> serde_json::Value {
    let bytes = v.len();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(v) {
        if bytes <= SHOWN_VALUE_BYTES {
            return serde_json::json!({ "bytes": bytes, "json": json });
        }
    }
    match std::str::from_utf8(v) {
        Ok(text) => {
            let mut end = text.len().min(SHOWN_VALUE_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let mut out = serde_json::json!({ "bytes": bytes, "text": &text[..end] });
            if end < text.len() {
                out["truncated"] = serde_json::Value::Bool(true);
            }
            out
        }
        Err(_) => {
            use base64::Engine as _;
            let end = bytes.min(SHOWN_VALUE_BYTES);
            let mut out = serde_json::json!({
                "bytes": bytes,
                "base64": base64::engine::general_purpose::STANDARD.encode(&v[..end]),
            });
            if end < bytes {
                out["truncated"] = serde_json::Value::Bool(true);
            }
            out
        }
    }
}

pub fn show(r: &DlqRecord) -> Shown<'_> {
    let value = match (r.header(h::REPLAY_TARGET), r.value.as_deref()) {
        (_, None) => serde_json::Value::Null,
        (Some("task"), Some(v)) => match Task::decode(v) {
            Ok(t) => serde_json::json!({
                "user_id": t.user.user_id,
                "event_id": t.user.event_id,
                "finbox": t.finbox.outcome().map(|o| o.as_str()).unwrap_or("pending"),
                "credeau": t.credeau.outcome().map(|o| o.as_str()).unwrap_or("pending"),
            }),
            Err(e) => serde_json::json!({ "undecodable_task": e.to_string() }),
        },
        (_, Some(v)) => raw_value(v),
    };
    Shown {
        record: r,
        time: r.timestamp.and_then(rfc3339),
        failed_at: r
            .header(h::FAILED_AT)
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(rfc3339),
        value,
    }
}

/// The value for people: a JSON value pretty-printed, text as it is, bytes
/// that are not UTF-8 as text with each invalid byte as `\xNN`; control
/// characters escaped everywhere (no record writes to the terminal), each
/// line indented under `value:`.
fn value_text(v: &serde_json::Value, raw: Option<&[u8]>) -> String {
    let indent = |s: &str| {
        printable_str(s, Lines::Keep)
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    };
    let bytes = v.get("bytes").and_then(serde_json::Value::as_u64);
    let cut = if v.get("truncated").is_some() {
        format!(", first {SHOWN_VALUE_BYTES} shown")
    } else {
        String::new()
    };
    match (bytes, v.get("json"), v.get("text"), v.get("base64")) {
        (Some(n), Some(json), _, _) => format!(
            "    value ({n} bytes, JSON):\n{}",
            indent(&serde_json::to_string_pretty(json).unwrap_or_default())
        ),
        (Some(n), None, Some(serde_json::Value::String(text)), _) => {
            format!("    value ({n} bytes, text{cut}):\n{}", indent(text))
        }
        (Some(n), None, None, Some(serde_json::Value::String(b64))) => match raw {
            Some(raw) => {
                let shown = &raw[..raw.len().min(SHOWN_VALUE_BYTES)];
                format!(
                    "    value ({n} bytes, not UTF-8, invalid bytes as \\xNN{cut}):\n{}",
                    indent(&printable(shown, Lines::Keep))
                )
            }
            None => format!(
                "    value ({n} bytes, binary, Base64{cut}):\n{}",
                indent(b64)
            ),
        },
        _ => format!(
            "    value:\n{}",
            indent(&serde_json::to_string_pretty(v).unwrap_or_default())
        ),
    }
}

pub fn render_text(records: &[DlqRecord], show_records: bool) -> String {
    let s = summarize(records);
    let mut out = format!("dead letters: {}\n", s.total);
    for (title, map) in [
        ("by reason", &s.by_reason),
        ("by provider", &s.by_provider),
        ("by http status", &s.by_http_status),
        ("by stage", &s.by_stage),
    ] {
        out.push_str(&format!("{title}:\n"));
        for (k, v) in map {
            out.push_str(&format!("  {:<24} {v}\n", printable_str(k, Lines::One)));
        }
    }
    if show_records {
        out.push_str("records:\n");
        for r in records {
            let shown = show(r);
            out.push_str(&format!(
                "- partition {} offset {} time {} reason {} stage {} key {}\n",
                r.partition,
                r.offset,
                shown.time.as_deref().unwrap_or("-"),
                printable_str(r.reason(), Lines::One),
                printable_str(r.header(h::STAGE).unwrap_or("-"), Lines::One),
                r.raw_key
                    .as_deref()
                    .map(|k| printable(k, Lines::One))
                    .or_else(|| r.key.as_deref().map(|k| printable_str(k, Lines::One)))
                    .unwrap_or_else(|| "-".into()),
            ));
            for (k, v) in &r.headers {
                out.push_str(&format!(
                    "    {}: {}\n",
                    printable_str(k, Lines::One),
                    header_text(k, v)
                ));
            }
            out.push_str(&value_text(&shown.value, r.value.as_deref()));
        }
    }
    out
}

pub fn render_json(records: &[DlqRecord]) -> String {
    let shown: Vec<Shown<'_>> = records.iter().map(show).collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "summary": summarize(records),
        "records": shown,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input_record(value: &[u8]) -> DlqRecord {
        DlqRecord {
            partition: 0,
            offset: 7,
            timestamp: Some(1_700_000_000_250),
            key: Some("k".into()),
            headers: [
                (h::REPLAY_TARGET, "input"),
                (h::FAILED_AT, "1700000000250"),
                (h::ORIGINAL_TIMESTAMP, "1700000000000"),
                (h::ERROR_MESSAGE, "expected value at line 1 column 29"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            raw_key: None,
            value: Some(value.to_vec()),
        }
    }

    #[test]
    fn json_values_are_shown_pretty_and_unescaped_with_rfc3339_times() {
        let value = br#"{"event_id":"e-1","user_id":"caf\u00e9 \"q\"","onboarded_at":1}"#;
        let text = render_text(&[input_record(value)], true);
        assert!(text.contains("time 2023-11-14T22:13:20.250Z"), "{text}");
        assert!(
            text.contains("    dlq.failed_at: 2023-11-14T22:13:20.250Z\n"),
            "{text}"
        );
        assert!(
            text.contains("    dlq.original.timestamp: 2023-11-14T22:13:20.000Z\n"),
            "{text}"
        );
        assert!(!text.contains("1700000000"), "{text}");
        assert!(
            text.contains(&format!("value ({} bytes, JSON):", value.len())),
            "{text}"
        );
        assert!(
            text.contains("      {\n        \"event_id\": \"e-1\","),
            "{text}"
        );
        // One level of JSON escaping, as in the record: no `\\"`.
        assert!(text.contains(r#""user_id": "café \"q\"""#), "{text}");
        assert!(!text.contains(r#"\\"#), "{text}");

        let json: serde_json::Value =
            serde_json::from_str(&render_json(&[input_record(value)])).unwrap();
        let r = &json["records"][0];
        assert_eq!(r["time"], "2023-11-14T22:13:20.250Z");
        assert_eq!(r["failed_at"], "2023-11-14T22:13:20.250Z");
        assert_eq!(r["value"]["json"]["user_id"], "café \"q\"");
        assert_eq!(r["value"]["bytes"], value.len());
    }

    #[test]
    fn text_and_binary_values_are_shown_as_they_are() {
        let poison = br#"{"event_id": "x", "user_id": "#;
        let text = render_text(&[input_record(poison)], true);
        assert!(
            text.contains(&format!(
                "value ({} bytes, text):\n      {{\"event_id\": \"x\", \"user_id\": \n",
                poison.len()
            )),
            "{text}"
        );
        let binary = [0u8, 159, 146, 150];
        let text = render_text(&[input_record(&binary)], true);
        assert!(
            text.contains(
                "value (4 bytes, not UTF-8, invalid bytes as \\xNN):\n      \\x00\\x9f\\x92\\x96\n"
            ),
            "{text}"
        );
        // Scripts get the exact bytes.
        assert_eq!(show_value_of(&binary)["base64"], "AJ+Slg==");
        let long = "é".repeat(SHOWN_VALUE_BYTES);
        let shown = show_value_of(long.as_bytes());
        assert_eq!(shown["truncated"], true);
        assert!(shown["text"].as_str().unwrap().len() <= SHOWN_VALUE_BYTES);
    }

    #[test]
    fn control_characters_never_reach_the_terminal_and_utf8_stays_text() {
        let mut r =
            input_record(b"caf\xc3\xa9 \x00\x01 \x1b[2J\x1b]0;owned\x07 \xc2\x9b1m\nline two");
        r.key = Some("k\u{1b}[31m".into());
        r.raw_key = Some(b"k\x1b[31m\xff".to_vec());
        r.headers
            .insert("app.note".into(), "caf\u{e9}\u{1b}[5m\nx".into());
        r.headers.insert(h::ERROR_CLASS.into(), "bad\u{7}".into());
        let text = render_text(&[r], true);
        assert!(
            !text.bytes().any(|b| b < 0x20 && b != b'\n'),
            "control bytes in the output: {text:?}"
        );
        assert!(
            !text.contains('\u{7f}') && !text.contains('\u{9b}'),
            "{text:?}"
        );
        assert!(
            text.contains(
                "      café \\x00\\x01 \\x1b[2J\\x1b]0;owned\\x07 \\u{9b}1m\n      line two\n"
            ),
            "{text}"
        );
        assert!(text.contains("key k\\x1b[31m\\xff\n"), "{text}");
        assert!(text.contains("    app.note: café\\x1b[5m\\nx\n"), "{text}");
        assert!(text.contains("  bad\\x07 "), "{text}");
    }

    fn show_value_of(v: &[u8]) -> serde_json::Value {
        let r = input_record(v);
        show(&r).value
    }
}
