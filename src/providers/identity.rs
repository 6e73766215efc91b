//! Whose data an answer is. FinBox echoes the `customer_id` it answered
//! for, and every Credeau SMS entry names its `user_id`: an answer naming
//! someone else is never published as this user's data. How ids are
//! compared is documented in docs/events.md ("Identity checks").

use super::http::{error, truncate};
use super::{Provider, ProviderError, ProviderErrorKind};

/// Whether the id a provider's answer names is the one we asked for.
/// Ids are compared exactly (case-sensitive, no Unicode normalisation):
/// both providers treat them as opaque strings, and FinBox's salt hashes
/// the exact bytes, so `abc` and `ABC` are two customers. The one leniency
/// is whitespace around the echoed id, which a provider's storage may pad
/// or keep: it is ignored. An empty echo names nobody and is not checked
/// (the caller skips absent and null ones).
pub fn same_id(asked: &str, answered: &str) -> bool {
    let answered = answered.trim();
    answered.is_empty() || answered == asked || answered == asked.trim()
}

/// The error for an answer about someone else: never retried (the provider
/// answers the same way again), dead-lettered with both ids.
pub fn mismatch(
    provider: Provider,
    http_status: Option<u16>,
    asked: &str,
    answered: &str,
    detail: &str,
) -> ProviderError {
    let field = match provider {
        Provider::Finbox => "customer_id",
        Provider::Credeau => "user_id",
    };
    let mut e = error(
        provider,
        ProviderErrorKind::IdentityMismatch,
        http_status,
        format!(
            "the answer is about another {field}: asked for {:?}, answered {:?}{detail}; not published as this user's data",
            truncate(asked, 260),
            truncate(answered, 260),
        ),
    );
    e.answered_id = Some(truncate(answered, 260));
    e
}

/// An entry's top-level `user_id` when it is a string (`None` when it is
/// missing or of another type). The entry is JSON object text already
/// checked whole when the answer was read, so this reads its keys only up
/// to `user_id`, skipping the values before it without decoding them:
/// the rest of the entry (its SMS body among it) is not scanned again.
pub fn entry_user_id(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = &text[i..key_end];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_end = value_end(b, i)?;
        let is_user_id = key == "\"user_id\""
            || (key.contains('\\')
                && serde_json::from_str::<String>(key).is_ok_and(|k| k == "user_id"));
        if is_user_id {
            return serde_json::from_str::<std::borrow::Cow<'_, str>>(&text[i..value_end]).ok();
        }
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The index just past the string that opens at `i` (a `"`).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// The index just past the JSON value that starts at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_exactly_apart_from_surrounding_whitespace() {
        assert!(same_id("u-1", "u-1"));
        assert!(same_id("u-1", " u-1\n"));
        assert!(same_id("u-1", ""), "an empty echo names nobody");
        assert!(!same_id("u-1", "u-2"));
        assert!(!same_id("abc", "ABC"), "case matters");
        assert!(!same_id("u-1", "u-1 x"));
    }

    #[test]
    fn the_error_names_both_ids_and_is_not_retryable() {
        let e = mismatch(Provider::Finbox, Some(200), "c-1", "c-2", "");
        assert_eq!(e.kind, ProviderErrorKind::IdentityMismatch);
        assert!(!e.is_retryable());
        assert!(
            e.message.contains("\"c-1\"") && e.message.contains("\"c-2\""),
            "{}",
            e.message
        );
        assert_eq!(e.answered_id.as_deref(), Some("c-2"));
    }

    #[test]
    fn an_entrys_user_id_is_read_up_to_its_key_like_serde_reads_it() {
        let cases = [
            r#"{"_id":"a","user_id":"u-1","sms_body":"x"}"#,
            r#" { "nested" : {"user_id":"inner","l":[1,{"a":"]}"}]} , "user_id" : "u-2" } "#,
            r#"{"sms_body":"quote \" and \\ back","user_id":"u-\u00e9"}"#,
            r#"{"user\u005fid":"escaped-key"}"#,
            r#"{"n":-1.5e3,"t":true,"z":null,"user_id":"u-3"}"#,
            r#"{"user_id":7}"#,
            r#"{"user_id":null}"#,
            r#"{"other":"x"}"#,
            r#"{}"#,
        ];
        #[derive(serde::Deserialize)]
        struct UserIdOnly<'a> {
            #[serde(borrow, default)]
            user_id: Option<std::borrow::Cow<'a, str>>,
        }
        for text in cases {
            let serde = serde_json::from_str::<UserIdOnly<'_>>(text)
                .ok()
                .and_then(|e| e.user_id);
            assert_eq!(entry_user_id(text), serde, "{text}");
        }
        // A key named twice: serde refuses the entry; the first is read.
        assert_eq!(
            entry_user_id(r#"{"user_id":"a","user_id":"b"}"#).as_deref(),
            Some("a")
        );
    }
}
