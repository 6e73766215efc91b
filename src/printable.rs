//! Bytes from other producers made safe to print on an operator's
//! terminal: valid UTF-8 stays text (`é`, not `\xc3\xa9`), control
//! characters and invalid bytes become escapes, so no escape sequence in
//! a record reaches the terminal.

use std::fmt::Write as _;

/// Which line breaks survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// `\n` and `\t` are kept (a multi-line value shown as it is).
    Keep,
    /// Everything is on one line: `\n`, `\r`, `\t` are escaped too.
    One,
}

/// Characters that are printable but rearrange what a terminal shows:
/// bidirectional overrides and isolates (a "Trojan Source" line reads
/// differently from what it holds).
fn reorders_text(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Appends one character, escaped when a terminal would act on it.
fn push_char(out: &mut String, c: char, lines: Lines) {
    match c {
        '\n' | '\t' if lines == Lines::Keep => out.push(c),
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 && c.is_control() => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if c.is_control() || reorders_text(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// `bytes` as printable text: valid UTF-8 as it is, control characters
/// (C0, DEL, C1) and bidirectional controls escaped (`\x1b`, `\u{9b}`),
/// each invalid byte as `\xNN`.
pub fn printable(bytes: &[u8], lines: Lines) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c, lines);
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// As [`printable`] on one line, with `"` and `\\` escaped too: for a
/// value quoted inside a message.
pub fn quoted(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c => push_char(&mut out, c, Lines::One),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A string as printable text (see [`printable`]).
pub fn printable_str(s: &str, lines: Lines) -> String {
    printable(s.as_bytes(), lines)
}

/// Bytes that may not be UTF-8 as a string without losing what they were:
/// valid UTF-8 as it is, each invalid byte as `\xNN` (control characters
/// are kept; [`printable`] escapes them for a terminal).
pub fn lossless_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_utf8_stays_text_and_controls_and_invalid_bytes_are_escaped() {
        let v = b"caf\xc3\xa9 \x00\x01\x1b[31mred\x7f \xff\xfe end";
        assert_eq!(
            printable(v, Lines::One),
            "café \\x00\\x01\\x1b[31mred\\x7f \\xff\\xfe end"
        );
    }

    #[test]
    fn c1_controls_and_bidi_overrides_are_escaped_as_code_points() {
        // U+009B is a one-character CSI on terminals that honour C1.
        let s = "a\u{9b}31mb \u{202e}evil\u{2066}";
        assert_eq!(
            printable_str(s, Lines::One),
            "a\\u{9b}31mb \\u{202e}evil\\u{2066}"
        );
    }

    #[test]
    fn line_breaks_are_kept_only_when_asked() {
        let v = b"one\ntwo\tthree\r\n";
        assert_eq!(printable(v, Lines::Keep), "one\ntwo\tthree\\r\n");
        assert_eq!(printable(v, Lines::One), "one\\ntwo\\tthree\\r\\n");
    }

    #[test]
    fn quoted_escapes_quotes_and_backslashes_as_well() {
        assert_eq!(quoted(b"\"a\\b\" \xc3\xa9\n"), "\\\"a\\\\b\\\" é\\n");
    }

    #[test]
    fn lossless_text_escapes_only_invalid_bytes() {
        assert_eq!(lossless_text(b"\xc3\xa9\x00\xc3"), "é\u{0}\\xc3");
    }
}
