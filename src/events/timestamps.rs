//! Lenient parsing of FinBox's timestamps. The document says
//! `YYYY-MM-DDThh:mm:ss:mil` (a colon before the milliseconds), which no
//! standard parser reads; real answers have been seen with a dot, without
//! milliseconds, with a space instead of `T`, or as RFC 3339. FinBox does not
//! state a zone: the value is read as UTC. Anything else yields `None`, and
//! the raw string is still published verbatim.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

use crate::task::Millis;

pub fn parse_finbox_timestamp(raw: &str) -> Option<Millis> {
    let s = raw.trim();
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_millis());
    }
    let (date, time) = s.split_once(['T', ' '])?;
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let time = time.strip_suffix('Z').unwrap_or(time);
    // "hh:mm:ss" then an optional ":mil" or ".mil" fraction.
    let (hms, frac) = match time.get(..8) {
        Some(hms) => (hms, &time[8..]),
        None => return None,
    };
    let hms = NaiveTime::parse_from_str(hms, "%H:%M:%S").ok()?;
    let millis = match frac.as_bytes().first() {
        None => 0,
        Some(b':' | b'.') => fraction_millis(&frac[1..])?,
        Some(_) => return None,
    };
    let dt = NaiveDateTime::new(date, hms).and_utc();
    Some(dt.timestamp_millis() + millis)
}

/// "003" -> 3, "3" -> 300 (a decimal fraction), "123456" -> 123.
fn fraction_millis(digits: &str) -> Option<i64> {
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let padded = format!("{digits:0<3}");
    padded[..3].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Millis = 1_546_497_464_000; // 2019-01-03T06:37:44Z

    #[test]
    fn documented_colon_milliseconds_parse_as_utc() {
        assert_eq!(
            parse_finbox_timestamp("2019-01-03T06:37:44:003"),
            Some(BASE + 3)
        );
    }

    #[test]
    fn common_variants_parse() {
        assert_eq!(
            parse_finbox_timestamp("2019-01-03T06:37:44.25"),
            Some(BASE + 250)
        );
        assert_eq!(parse_finbox_timestamp("2019-01-03 06:37:44"), Some(BASE));
        assert_eq!(parse_finbox_timestamp("2019-01-03T06:37:44Z"), Some(BASE));
        assert_eq!(
            parse_finbox_timestamp("2019-01-03T12:07:44.003+05:30"),
            Some(BASE + 3)
        );
    }

    #[test]
    fn garbage_gives_none() {
        for s in [
            "",
            "yesterday",
            "2019-13-03T06:37:44:003",
            "2019-01-03T06:37",
            "2019-01-03T06:37:44:x",
        ] {
            assert_eq!(parse_finbox_timestamp(s), None, "{s}");
        }
    }
}
