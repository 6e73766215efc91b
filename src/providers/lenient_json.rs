//! Reading provider answers that are almost JSON. Python's `json.dumps`
//! writes `NaN`, `Infinity` and `-Infinity` by default, an encoder that cut
//! an emoji in half writes a lone surrogate escape (`"\ud83d"`), a number
//! beyond double range (`1e400`) is valid JSON text that no double holds,
//! and some servers put a UTF-8 byte-order mark before the body. The same
//! answer comes back every time, so asking again cannot help: such a body
//! is repaired into standard JSON (and the repair named), never retried.
//!
//! Strict parsing is tried first by the callers; this module runs only when
//! it failed, so the common path pays nothing. What cannot be repaired is
//! described without quoting the body (it may hold SMS text): invalid UTF-8
//! and where, a gzip stream nobody asked for, a UTF-16 body.

/// A body rewritten into standard JSON, and what was changed to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// Standard JSON text: `NaN`/`Infinity`/`-Infinity` as `null`, lone
    /// surrogate escapes as `\ufffd`, numbers beyond double range as
    /// strings holding their text, and no byte-order mark.
    pub text: String,
    /// What was repaired, for `data_problem` ("2 non-finite numbers (NaN,
    /// Infinity) read as null"); empty when nothing was.
    pub notes: Vec<String>,
}

impl Repaired {
    /// The notes as one sentence, `None` when nothing was repaired.
    pub fn summary(&self) -> Option<String> {
        (!self.notes.is_empty()).then(|| self.notes.join("; "))
    }
}

/// Why a body cannot be read as JSON at all, said without quoting it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    #[error(
        "a gzip stream (bytes 1f 8b) that was not decoded: compression the request did not ask for"
    )]
    UndeclaredGzip,
    #[error("a UTF-16 body (byte-order mark {0}); JSON must be UTF-8")]
    Utf16(&'static str),
}

/// Rewrites `body` into standard JSON, or says why it is not text JSON can
/// be read from. The result may still fail to parse (a truncated body
/// stays truncated); that is the caller's strict parser's to report.
pub fn repair(body: &[u8]) -> Result<Repaired, Unreadable> {
    let mut notes = Vec::new();
    if body.starts_with(&[0x1f, 0x8b]) {
        return Err(Unreadable::UndeclaredGzip);
    }
    if body.starts_with(&[0xff, 0xfe]) {
        return Err(Unreadable::Utf16("ff fe"));
    }
    if body.starts_with(&[0xfe, 0xff]) {
        return Err(Unreadable::Utf16("fe ff"));
    }
    let body = match body.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => {
            notes.push("a UTF-8 byte-order mark before the JSON was skipped".to_string());
            rest
        }
        None => body,
    };
    let text = std::str::from_utf8(body).map_err(|e| {
        let bom = if notes.is_empty() { 0 } else { 3 };
        Unreadable::InvalidUtf8(e.valid_up_to() + bom)
    })?;
    let mut out = String::with_capacity(text.len() + 16);
    let mut non_finite: Vec<&'static str> = Vec::new();
    let mut huge = 0usize;
    let mut surrogates = 0usize;
    let mut non_finite_total = 0usize;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' {
            let end = string_end(bytes, i);
            surrogates += copy_string(&text[i..end], &mut out);
            i = end;
        } else if b == b'-' || b.is_ascii_digit() || b == b'N' || b == b'I' {
            let end = token_end(bytes, i);
            let token = &text[i..end];
            match token {
                "NaN" | "Infinity" | "-Infinity" => {
                    out.push_str("null");
                    let name = match token {
                        "NaN" => "NaN",
                        "-Infinity" => "-Infinity",
                        _ => "Infinity",
                    };
                    if !non_finite.contains(&name) {
                        non_finite.push(name);
                    }
                    non_finite_total += 1;
                }
                _ if is_number(token) && token.parse::<f64>().is_ok_and(f64::is_infinite) => {
                    huge += 1;
                    out.push('"');
                    out.push_str(token);
                    out.push('"');
                }
                _ => out.push_str(token),
            }
            i = end.max(i + 1);
        } else {
            // Structural characters, whitespace, true/false/null: copied.
            let ch_len = utf8_len(b);
            out.push_str(&text[i..i + ch_len]);
            i += ch_len;
        }
    }
    if !non_finite.is_empty() {
        notes.push(format!(
            "{} non-finite number{} ({}) read as null",
            non_finite_total,
            if non_finite_total == 1 { "" } else { "s" },
            non_finite.join(", ")
        ));
    }
    if huge > 0 {
        notes.push(format!(
            "{huge} number{} beyond double range kept as text",
            if huge == 1 { "" } else { "s" }
        ));
    }
    if surrogates > 0 {
        notes.push(format!(
            "{surrogates} lone UTF-16 surrogate escape{} read as U+FFFD",
            if surrogates == 1 { "" } else { "s" }
        ));
    }
    Ok(Repaired { text: out, notes })
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// The index just past the string starting at `start` (a `"`), or the end
/// of the text when it is not closed.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index just past a bare token (number or literal) at `start`.
fn token_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < bytes.len()
        && matches!(bytes[i], b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
    {
        i += 1;
    }
    i
}

fn is_number(token: &str) -> bool {
    let t = token.strip_prefix('-').unwrap_or(token);
    t.starts_with(|c: char| c.is_ascii_digit())
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
}

/// Copies one JSON string (with its quotes), replacing lone surrogate
/// escapes by `\ufffd`. Returns how many it replaced.
fn copy_string(s: &str, out: &mut String) -> usize {
    let bytes = s.as_bytes();
    let mut replaced = 0;
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let Some(unit) = hex4(bytes, i + 2) else {
            i += 2;
            continue;
        };
        let escape_len = 6;
        if (0xd800..0xdc00).contains(&unit) {
            // A high surrogate must be followed by a low one.
            let paired = bytes.get(i + 6) == Some(&b'\\')
                && bytes.get(i + 7) == Some(&b'u')
                && hex4(bytes, i + 8).is_some_and(|low| (0xdc00..0xe000).contains(&low));
            if paired {
                i += 12;
                continue;
            }
        } else if !(0xdc00..0xe000).contains(&unit) {
            i += escape_len;
            continue;
        }
        out.push_str(&s[last..i]);
        out.push_str("\\ufffd");
        replaced += 1;
        i += escape_len;
        last = i;
    }
    out.push_str(&s[last..]);
    replaced
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

/// A description of a body that strict and lenient reading both failed on,
/// for an error message: what made it unreadable, never its content.
pub fn describe_unreadable(e: &Unreadable) -> String {
    format!("unreadable body: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn read(body: &[u8]) -> (Value, Vec<String>) {
        let r = repair(body).unwrap();
        let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("{e}: {}", r.text));
        (v, r.notes)
    }

    #[test]
    fn standard_json_comes_back_unchanged_without_notes() {
        let body = br#"{"a": [1, -2.5e3, "x\"NaN", true, null, "\ud83d\ude00"]}"#;
        let r = repair(body).unwrap();
        assert_eq!(r.text.as_bytes(), body);
        assert!(r.notes.is_empty());
    }

    #[test]
    fn non_finite_numbers_become_null_and_are_named() {
        let (v, notes) =
            read(br#"{"data": [{"name": "a", "value": NaN}, {"name": "b", "value": -Infinity}, {"name": "c", "value": Infinity}], "s": "NaN"}"#);
        assert_eq!(v["data"][0]["value"], Value::Null);
        assert_eq!(v["data"][1]["value"], Value::Null);
        assert_eq!(v["s"], "NaN", "inside a string it is text");
        assert_eq!(
            notes,
            ["3 non-finite numbers (NaN, -Infinity, Infinity) read as null"]
        );
    }

    #[test]
    fn a_number_beyond_double_range_is_kept_as_its_text() {
        assert!(serde_json::from_slice::<Value>(br#"{"v": 1e400}"#).is_err());
        let (v, notes) = read(br#"{"v": 1e400, "w": -2E+999, "ok": 1e300}"#);
        assert_eq!(v, json!({"v": "1e400", "w": "-2E+999", "ok": 1e300}));
        assert_eq!(notes, ["2 numbers beyond double range kept as text"]);
    }

    #[test]
    fn lone_surrogates_become_the_replacement_character_and_pairs_stay() {
        assert!(serde_json::from_slice::<Value>(br#"{"t": "ab\ud83d"}"#).is_err());
        let (v, notes) =
            read(br#"{"t": "ab\ud83d", "u": "\ude00x", "pair": "\ud83d\ude00", "esc": "\\ud83d"}"#);
        assert_eq!(v["t"], "ab\u{fffd}");
        assert_eq!(v["u"], "\u{fffd}x");
        assert_eq!(v["pair"], "\u{1f600}");
        assert_eq!(v["esc"], "\\ud83d", "an escaped backslash is not an escape");
        assert_eq!(notes, ["2 lone UTF-16 surrogate escapes read as U+FFFD"]);
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_named() {
        let (v, notes) = read(b"\xef\xbb\xbf{\"status\": \"complete\"}");
        assert_eq!(v, json!({"status": "complete"}));
        assert_eq!(
            notes,
            ["a UTF-8 byte-order mark before the JSON was skipped"]
        );
    }

    #[test]
    fn unreadable_bodies_say_why_without_quoting_them() {
        assert_eq!(
            repair(b"{\"a\": \"caf\xe9 secret\"}"),
            Err(Unreadable::InvalidUtf8(10))
        );
        assert_eq!(
            repair(b"\xef\xbb\xbf{\"a\": \"\xff\"}"),
            Err(Unreadable::InvalidUtf8(10))
        );
        assert_eq!(
            repair(&[0x1f, 0x8b, 8, 0, 0, 0]),
            Err(Unreadable::UndeclaredGzip)
        );
        assert_eq!(repair(b"\xff\xfe{\0"), Err(Unreadable::Utf16("ff fe")));
        let msg = describe_unreadable(&Unreadable::InvalidUtf8(10));
        assert_eq!(msg, "unreadable body: invalid UTF-8 at byte 10");
    }
}
