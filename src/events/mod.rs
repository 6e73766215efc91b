//! The event contract with the outside world: decoding "user onboarded"
//! input events and building the three output events (FinBox predictors,
//! SMS extraction, insights ready), in JSON or in Avro with a
//! Confluent-compatible schema registry. The schemas themselves live in
//! `schemas/` and the contract for consumers in `docs/events.md`.

pub mod avro;
pub mod dead_letter;
mod encode_error;
pub mod input;
pub mod output;
pub mod registry;
mod sms;
mod startup;
pub mod timestamps;

pub use dead_letter::DeadLetter;
pub use input::{DecodeError, InputDecoder, UserOnboarded, DEFAULT_MAX_INPUT_BYTES};
pub use output::{EncodeError, OutputEncoder};
pub use registry::{RegistryClient, RegistryError};

/// How much of a record may be quoted in an error message.
const QUOTED_PREFIX_BYTES: usize = 32;
/// Library error texts are cut to this length before they reach ours.
const MAX_MESSAGE_CHARS: usize = 200;

/// The first bytes of a value, escaped so the result is printable (valid
/// UTF-8 as text, control characters and invalid bytes escaped); the only
/// part of a record an error message may carry.
pub(crate) fn escaped_prefix(bytes: &[u8]) -> String {
    let mut end = bytes.len().min(QUOTED_PREFIX_BYTES);
    // Not inside a character: a cut `é` would read as an invalid byte.
    if let Err(e) = std::str::from_utf8(&bytes[..end]) {
        if e.error_len().is_none() && end < bytes.len() {
            end = e.valid_up_to();
        }
    }
    let cut = &bytes[..end];
    let mut s = crate::printable::quoted(cut);
    if bytes.len() > cut.len() {
        s.push_str("...");
    }
    s
}

/// Bounds a third-party error text, which may describe the offending value.
pub(crate) fn truncate_message(msg: &str) -> String {
    match msg.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}...", &msg[..at]),
        None => msg.to_string(),
    }
}

/// The `<topic>-value` subject naming (Confluent's TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_prefix_is_short_and_escaped() {
        let s = escaped_prefix(&[b'a'; 100]);
        assert_eq!(s, format!("{}...", "a".repeat(32)));
        assert_eq!(escaped_prefix(b"\x00\xff\"x"), "\\x00\\xff\\\"x");
        // Valid UTF-8 stays text, and the cut never splits a character.
        assert_eq!(escaped_prefix("café \u{1b}[2J".as_bytes()), "café \\x1b[2J");
        let s = escaped_prefix("é".repeat(20).as_bytes());
        assert_eq!(s, format!("{}...", "é".repeat(16)));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(500);
        let cut = truncate_message(&long);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 3);
        assert_eq!(truncate_message("short"), "short");
    }
}
