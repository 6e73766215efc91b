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
}
