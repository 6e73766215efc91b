//! Registering the output schemas at start-up: wait for the registry while
//! it does not answer (bounded, as for the brokers), check every subject's
//! compatibility before registering any, so an incompatible schema leaves
//! the registry as it was, then register them all.

use std::time::Instant;

use super::avro::{EventSchema, SchemaError};
use super::encode_error::EncodeError;
use super::registry::{Compatibility, RegistryClient, RegistryError};
use super::value_subject;

/// Pause between two attempts while the registry does not answer.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Registers each `(topic, schema)` under `<topic>-value`; returns the ids
/// in the same order.
pub(crate) async fn register_all(
    registry: &RegistryClient,
    schemas: &[(&str, EventSchema)],
) -> Result<Vec<u32>, EncodeError> {
    let mut prepared = Vec::with_capacity(schemas.len());
    for (topic, schema) in schemas {
        prepared.push((value_subject(topic), compact(*schema)?));
    }
    let started = Instant::now();
    let mut incompatible = Vec::new();
    for (subject, text) in &prepared {
        let answer = retrying(registry, started, subject, || {
            registry.check_compatibility(subject, text)
        })
        .await?;
        if let Compatibility::Incompatible(reasons) = answer {
            let why = if reasons.is_empty() {
                match why_refused(registry, started, subject, text).await? {
                    Some(why) => why,
                    // Registered after all: the registry's two answers
                    // disagree, and the second one is what counts.
                    None => continue,
                }
            } else {
                reasons.join("; ")
            };
            incompatible.push((subject.clone(), why));
        }
    }
    if !incompatible.is_empty() {
        return Err(EncodeError::Incompatible {
            url: registry.base_url().to_string(),
            subjects: incompatible,
        });
    }
    let mut ids = Vec::with_capacity(prepared.len());
    for (subject, text) in &prepared {
        ids.push(
            retrying(registry, started, subject, || {
                registry.register(subject, text)
            })
            .await?,
        );
    }
    Ok(ids)
}

/// The reasons for an incompatibility when the compatibility check gave
/// none (Apicurio's Confluent API answers only `is_compatible`): the
/// registration of an incompatible schema is refused with them, so asking
/// registers nothing. `None` when the registry accepts it after all.
async fn why_refused(
    registry: &RegistryClient,
    started: Instant,
    subject: &str,
    text: &str,
) -> Result<Option<String>, EncodeError> {
    match retrying(registry, started, subject, || async move {
        match registry.register(subject, text).await {
            Err(RegistryError::Status { status, message }) if status == 409 || status == 422 => {
                Ok(Err(format!("HTTP {status}: {message}")))
            }
            other => other.map(Ok),
        }
    })
    .await?
    {
        Ok(_) => Ok(None),
        Err(why) => Ok(Some(why)),
    }
}

/// The schema's JSON in compact form: the registry normalizes whitespace
/// itself, and this keeps requests small and the cache key stable. Parsed
/// first so a broken built-in schema is reported as such.
fn compact(schema: EventSchema) -> Result<String, EncodeError> {
    schema.schema()?;
    serde_json::from_str::<serde_json::Value>(schema.text())
        .map(|v| v.to_string())
        .map_err(|e| {
            EncodeError::Schema(SchemaError {
                schema: schema.file_stem(),
                reason: e.to_string(),
            })
        })
}

/// Calls `call` until it gets an answer other than "no answer": a refused
/// connection, a timeout or an HTTP 5xx are tried again, once a second,
/// until the registry's start-up wait since `started` is over.
async fn retrying<T, F, Fut>(
    registry: &RegistryClient,
    started: Instant,
    subject: &str,
    mut call: F,
) -> Result<T, EncodeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let wait = registry.startup_wait();
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if no_answer(&e) => {
                if started.elapsed() + RETRY_PAUSE > wait {
                    return Err(EncodeError::RegistryUnavailable {
                        url: registry.base_url().to_string(),
                        waited: started.elapsed(),
                        source: e,
                    });
                }
                tracing::warn!(
                    registry = registry.base_url(),
                    error = %e,
                    "schema registry not answering; trying again"
                );
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(source) => {
                return Err(EncodeError::Registry {
                    subject: subject.to_string(),
                    source,
                })
            }
        }
    }
}

fn no_answer(e: &RegistryError) -> bool {
    match e {
        RegistryError::Transport(_) => true,
        RegistryError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Nothing listens: start-up waits for the registry as long as it is
    /// told, then stops with the registry's URL (never its credentials).
    #[tokio::test]
    async fn an_unreachable_registry_is_waited_for_within_the_bound_and_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let registry = RegistryClient::new(&format!("http://svc:s3cret@127.0.0.1:{port}/ccompat"))
            .unwrap()
            .with_startup_wait(Duration::from_secs(3));
        let began = Instant::now();
        let err = register_all(&registry, &[("t", EventSchema::InsightsReady)])
            .await
            .unwrap_err();
        let waited = began.elapsed();
        let text = err.to_string();
        assert!(
            matches!(err, EncodeError::RegistryUnavailable { .. }),
            "{text}"
        );
        assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
        assert!(waited < Duration::from_secs(6), "waited {waited:?}");
        assert!(
            text.contains(&format!("http://127.0.0.1:{port}/ccompat")),
            "{text}"
        );
        assert!(!text.contains("s3cret") && !text.contains("svc"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
}
