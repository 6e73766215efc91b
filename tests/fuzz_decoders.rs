//! Fuzzing, with proptest, of everything that parses bytes from outside:
//! the JSON and Avro (Confluent wire format, writer schemas from the registry
//! fake of tests/common) input decoders, the FinBox and Credeau response mappers, and the
//! task record decoder. Each target is fed arbitrary bytes, structure-aware
//! inputs (well-formed values with arbitrary contents, Avro with lying
//! length prefixes) and byte-level mutations of valid inputs. Every case
//! must return (no panic), within a time bound, with its peak heap use
//! (counted by this binary's allocator, per thread) bounded by its size;
//! a separate test does the same for inputs of several megabytes.
//!
//! FUZZ_CASES sets the cases per target (default 2000, the normal suite);
//! the long pass is `FUZZ_CASES=1000000 cargo test --release --test
//! fuzz_decoders -- --nocapture`, which prints the figures of each target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use insights_enricher::config::InputEncoding;
use insights_enricher::events::avro::EventSchema;
use insights_enricher::events::avro::{put_long, put_opt_str, put_str, put_wire_header};
use insights_enricher::events::{InputDecoder, RegistryClient};
use insights_enricher::providers::{credeau, finbox, CredeauAnswer, FinboxAnswer, Provider};
use insights_enricher::task::{OnboardedUser, ProviderTrack, SourceRef, Task, TASK_VERSION};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

mod common;

// ---------------------------------------------------------------- heap

/// The system allocator, counting live bytes per thread and the peak since
/// the last reset, so each case's heap use can be bounded. Decoding runs on
/// the test's own thread (current-thread runtime), so parallel tests and
/// the registry stub's thread do not blur the figure.
struct CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // try_with: the thread-local may already be gone while a thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result, its duration and the most heap it held
/// at once beyond what was live before.
fn measured<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    let peak = PEAK.with(Cell::get) - base;
    (out, took, peak.max(0) as usize)
}

// ---------------------------------------------------------------- bounds

fn release() -> bool {
    !cfg!(debug_assertions)
}

/// Generous for a loaded 2-core machine; a parser that loops or backtracks
/// exponentially misses it by orders of magnitude.
fn time_bound(len: usize) -> Duration {
    let per_mb = if release() { 2 } else { 20 };
    Duration::from_millis(if release() { 500 } else { 3000 })
        + Duration::from_secs(per_mb) * (len / (1 << 20)) as u32
}

/// Parsed JSON holds a few times its text; anything beyond this bound is
/// an allocation driven by what the input claims rather than what it is.
fn heap_bound(len: usize) -> usize {
    32 * len + (24 << 20)
}

/// Figures of one target's run, printed at the end.
#[derive(Default)]
struct Figures {
    cases: u64,
    max_time: Duration,
    max_heap: usize,
    ok: u64,
}

impl Figures {
    fn record(
        &mut self,
        len: usize,
        took: Duration,
        heap: usize,
        ok: bool,
    ) -> Result<(), TestCaseError> {
        self.cases += 1;
        self.ok += u64::from(ok);
        self.max_time = self.max_time.max(took);
        self.max_heap = self.max_heap.max(heap);
        prop_assert!(
            took <= time_bound(len),
            "{len}-byte input took {took:?} (bound {:?})",
            time_bound(len)
        );
        prop_assert!(
            heap <= heap_bound(len),
            "{len}-byte input held {heap} bytes of heap (bound {})",
            heap_bound(len)
        );
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Runs `strategy` through `check` for FUZZ_CASES cases and prints the
/// figures. Failures are not persisted into the source tree.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    check: impl Fn(&S::Value, &mut Figures) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let figures = std::cell::RefCell::new(Figures::default());
    let started = Instant::now();
    let result = runner.run(&strategy, |input| check(&input, &mut figures.borrow_mut()));
    let f = figures.into_inner();
    eprintln!(
        "fuzz {name}: {} cases in {:.1?} ({} accepted), slowest {:?}, most heap {} KiB, {}",
        f.cases,
        started.elapsed(),
        f.ok,
        f.max_time,
        f.max_heap / 1024,
        if result.is_ok() {
            "no failures"
        } else {
            "FAILED"
        }
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

// ---------------------------------------------------------------- inputs

/// Byte-level mutations of a valid input: flips, insertions of bytes and of
/// tokens that matter to the formats, deletions, truncation, duplication.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    const TOKENS: &[&[u8]] = &[
        b"\"",
        b"\\",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"null",
        b"true",
        b"-",
        b"0",
        b"1e999",
        b"-9223372036854775809",
        b"18446744073709551616",
        b"\\u0000",
        b"\\ud800",
        b"\x00",
        b"\xff",
        b"\xc3",
        b"\x01",
        b"\x7f\xff\xff\xff\x0f",
    ];
    let op = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| (0u8, i, vec![b])),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| (1u8, i, b)),
        (any::<usize>(), proptest::sample::select(TOKENS)).prop_map(|(i, t)| (1u8, i, t.to_vec())),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| (2u8, i, vec![n as u8])),
        any::<usize>().prop_map(|i| (3u8, i, vec![])),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| (4u8, i, vec![n as u8])),
    ];
    proptest::collection::vec(op, 1..6).prop_map(move |ops| {
        let mut v = seed.clone();
        for (kind, at, data) in ops {
            let i = if v.is_empty() { 0 } else { at % (v.len() + 1) };
            match kind {
                0 if !v.is_empty() => {
                    let i = i.min(v.len() - 1);
                    v[i] ^= data[0] | 1;
                }
                1 => {
                    v.splice(i..i, data);
                }
                2 => {
                    let end = (i + data[0] as usize).min(v.len());
                    v.drain(i..end);
                }
                3 => v.truncate(i),
                4 => {
                    let end = (i + data[0] as usize).min(v.len());
                    let copy = v[i..end].to_vec();
                    v.splice(i..i, copy);
                }
                _ => {}
            }
        }
        v
    })
}

fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..2048)
}

/// Strings that stress validation: empty, long, control and non-ASCII.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.:-]{0,70}",
        ".{0,80}",
        Just(String::new()),
        (1usize..5000).prop_map(|n| "u".repeat(n)),
        Just("\u{0}\u{202e}\u{fffd}é".to_string()),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        tricky_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(tricky_string(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

// ---------------------------------------------------------------- runtime

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writer schemas the registry stub serves: 1 is the reader schema itself,
/// 2 an evolved writer (an extra field, the optional ids missing), 3 a
/// schema that cannot be resolved against it. Any other id is unknown.
fn writer_schema(id: u32) -> Option<String> {
    match id {
        1 => Some(EventSchema::UserOnboarded.text().to_string()),
        2 => Some(
            json!({
                "type": "record", "name": "UserOnboarded",
                "namespace": "com.insightsenricher.events",
                "fields": [
                    {"name": "event_id", "type": "string"},
                    {"name": "user_id", "type": "string"},
                    {"name": "onboarded_at", "type": "long"},
                    {"name": "channel", "type": {"type": "array", "items": "string"}}
                ]
            })
            .to_string(),
        ),
        3 => Some(
            json!({
                "type": "record", "name": "UserOnboarded",
                "namespace": "com.insightsenricher.events",
                "fields": [
                    {"name": "event_id", "type": "int"},
                    {"name": "user_id", "type": {"type": "map", "values": "bytes"}}
                ]
            })
            .to_string(),
        ),
        _ => None,
    }
}

/// The registry fake (tests/common) on its own thread, for the whole
/// binary, holding the writer schemas above under ids 1 to 3. A fake, not
/// the run's real registry: the fuzzer draws schema ids from a small fixed
/// range (known, evolved, unresolvable, unknown), which needs ids the test
/// chooses; a real registry gives its own, and its ids are not dense. The
/// same decoding against the real registry is in tests/events.rs and
/// tests/pipeline_e2e.rs.
fn registry_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let registry = Arc::new(common::FakeRegistry::default());
        for id in 1..=3 {
            let schema = writer_schema(id).expect("writer schema");
            assert_eq!(registry.add(&schema), id, "ids are given in order");
        }
        registry.serve_on_own_thread()
    })
}

// ---------------------------------------------------------------- input events

fn valid_json_event() -> Vec<u8> {
    to_bytes(&json!({
        "event_id": "ev-1",
        "user_id": "user-1",
        "onboarded_at": 1_750_000_000_000i64,
        "finbox_customer_id": "fb-1",
        "credeau_user_id": null,
    }))
}

/// A well-formed JSON event whose fields hold anything.
fn structured_json_event() -> impl Strategy<Value = Vec<u8>> {
    (
        json_value(),
        json_value(),
        json_value(),
        proptest::option::of(json_value()),
        proptest::collection::btree_map("[a-z_]{1,20}", json_value(), 0..4),
    )
        .prop_map(|(event_id, user_id, at, fb, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            m.insert("event_id".into(), event_id);
            m.insert("user_id".into(), user_id);
            m.insert("onboarded_at".into(), at);
            if let Some(fb) = fb {
                m.insert("finbox_customer_id".into(), fb);
            }
            to_bytes(&Value::Object(m))
        })
}

fn check_event(
    result: &Result<
        insights_enricher::events::UserOnboarded,
        insights_enricher::events::DecodeError,
    >,
) -> Result<(), TestCaseError> {
    match result {
        Ok(e) => {
            prop_assert!(!e.user_id.is_empty() && e.user_id.chars().count() <= 64);
            prop_assert!(!e.event_id.is_empty() && e.event_id.chars().count() <= 128);
            prop_assert!(e.onboarded_at >= 946_684_800_000);
        }
        Err(e) => prop_assert!(
            e.to_string().len() <= 2048,
            "long error: {}",
            e.to_string().len()
        ),
    }
    Ok(())
}

#[test]
fn json_input_decoder_survives_arbitrary_and_mutated_input() {
    let rt = runtime();
    let decoder = InputDecoder::new(InputEncoding::Json, None);
    let strategy = prop_oneof![
        arbitrary_bytes(),
        structured_json_event(),
        mutated(valid_json_event()),
        json_value().prop_map(|v| to_bytes(&v)),
    ];
    fuzz("json_input", strategy, |bytes, figures| {
        let (result, took, heap) = measured(|| rt.block_on(decoder.decode(Some(bytes))));
        figures.record(bytes.len(), took, heap, result.is_ok())?;
        check_event(&result)
    });
}

/// The Confluent framing and an Avro datum for the reader schema, written
/// field by field so lengths and union branches can lie.
fn avro_event(
    id: u32,
    event_id: &str,
    user_id: &str,
    at: i64,
    fb: Option<&str>,
    tail: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    put_wire_header(&mut v, id);
    put_str(&mut v, event_id);
    put_str(&mut v, user_id);
    put_long(&mut v, at);
    put_opt_str(&mut v, fb);
    put_opt_str(&mut v, None);
    v.extend_from_slice(tail);
    v
}

fn structured_avro_event() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => Just(1u32), 2 => Just(2u32), 1 => Just(3u32), 1 => Just(99u32)],
        tricky_string(),
        tricky_string(),
        any::<i64>(),
        proptest::option::of(tricky_string()),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(id, e, u, at, fb, tail)| avro_event(id, &e, &u, at, fb.as_deref(), &tail))
}

/// Length prefixes and array counts that claim far more than follows.
fn lying_avro() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), Just(2u32)],
        any::<i64>(),
        0usize..3,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(id, claim, position, rest)| {
            let mut v = Vec::new();
            put_wire_header(&mut v, id);
            if position > 0 {
                put_str(&mut v, "ev-1");
            }
            if position > 1 {
                put_str(&mut v, "user-1");
            }
            put_long(&mut v, claim);
            v.extend_from_slice(&rest);
            v
        })
}

fn wire_with_arbitrary_datum() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), Just(2u32), Just(3u32)],
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(id, datum)| {
            let mut v = Vec::new();
            put_wire_header(&mut v, id);
            v.extend_from_slice(&datum);
            v
        })
}

#[test]
fn avro_input_decoder_survives_arbitrary_and_mutated_input() {
    let rt = runtime();
    let registry = Arc::new(RegistryClient::new(registry_url()).expect("registry client"));
    let decoder = InputDecoder::new(InputEncoding::Avro, Some(registry));
    let valid = avro_event(1, "ev-1", "user-1", 1_750_000_000_000, Some("fb-1"), &[]);
    let strategy = prop_oneof![
        2 => arbitrary_bytes(),
        3 => wire_with_arbitrary_datum(),
        3 => structured_avro_event(),
        2 => lying_avro(),
        // The header stays intact so mutations reach the datum.
        3 => mutated(valid[5..].to_vec()).prop_map(|d| [&[0u8, 0, 0, 0, 1][..], &d].concat()),
        1 => mutated(valid),
    ];
    fuzz("avro_input", strategy, |bytes, figures| {
        let (result, took, heap) = measured(|| rt.block_on(decoder.decode(Some(bytes))));
        figures.record(bytes.len(), took, heap, result.is_ok())?;
        if let Err(e) = &result {
            prop_assert!(!e.is_transient(), "registry stub unreachable: {e}");
        }
        check_event(&result)
    });
}

// ---------------------------------------------------------------- providers

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        proptest::sample::select(vec![
            200u16, 202, 204, 301, 400, 401, 403, 404, 422, 429, 500, 502, 503
        ]),
        0u16..1000,
    ]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        Just("application/json".to_string()),
        Just("application/json; charset=utf-8".to_string()),
        Just("text/html".to_string()),
        Just("text/plain".to_string()),
        ".{0,40}",
    ])
}

fn finbox_body() -> impl Strategy<Value = Vec<u8>> {
    let status = prop_oneof![
        proptest::sample::select(vec![
            "complete",
            "in_progress",
            "no_data",
            "not_found",
            "error"
        ])
        .prop_map(str::to_string),
        tricky_string(),
    ];
    let predictor =
        (tricky_string(), json_value()).prop_map(|(n, v)| json!({"name": n, "value": v}));
    let data = prop_oneof![
        proptest::collection::vec(predictor, 0..20).prop_map(Value::Array),
        json_value(),
    ];
    (
        status,
        proptest::option::of(tricky_string()),
        proptest::option::of(data),
        proptest::option::of(json_value()),
    )
        .prop_map(|(s, message, data, extra)| {
            let mut m = serde_json::Map::new();
            m.insert("status".into(), Value::from(s));
            m.insert("customer_id".into(), Value::from("user-1"));
            m.insert("request_id".into(), extra.unwrap_or(Value::from("r-1")));
            m.insert(
                "date_requested".into(),
                Value::from("2024-01-15T10:20:30:123"),
            );
            if let Some(msg) = message {
                m.insert("message".into(), Value::from(msg));
            }
            if let Some(d) = data {
                m.insert("data".into(), d);
            }
            to_bytes(&Value::Object(m))
        })
}

fn valid_finbox_complete() -> Vec<u8> {
    to_bytes(&json!({
        "customer_id": "user-1", "request_id": "r-1", "status": "complete",
        "date_requested": "2024-01-15T10:20:30:123", "date_processed": "2024-01-15T10:22:30:456",
        "message": "Success",
        "data": [{"name": "dc_score", "value": 712}, {"name": "salary", "value": null}, {"name": "x", "value": "y"}]
    }))
}

#[test]
fn finbox_response_mapper_survives_arbitrary_and_mutated_bodies() {
    let body = prop_oneof![
        arbitrary_bytes(),
        finbox_body(),
        mutated(valid_finbox_complete()),
        json_value().prop_map(|v| to_bytes(&v)),
    ];
    fuzz(
        "finbox_map_response",
        (status(), content_type(), body),
        |(st, ct, body), figures| {
            let (result, took, heap) = measured(|| finbox::map_response(*st, ct.as_deref(), body));
            figures.record(body.len(), took, heap, result.is_ok())?;
            match result {
                Ok(answer) => {
                    prop_assert!((200..300).contains(st), "answer {answer:?} for HTTP {st}");
                    if let FinboxAnswer::InProgress {
                        suggested_wait: Some(w),
                        ..
                    } = answer
                    {
                        prop_assert!(w <= Duration::from_secs(7 * 24 * 3600), "wait {w:?}");
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.provider, Provider::Finbox);
                    prop_assert!(
                        e.message.chars().count() <= 1024,
                        "message of {} chars",
                        e.message.len()
                    );
                }
            }
            Ok(())
        },
    );
}

fn credeau_body() -> impl Strategy<Value = Vec<u8>> {
    let entry = proptest::collection::btree_map(
        prop_oneof![
            proptest::sample::select(vec![
                "sms_id",
                "sms_body",
                "sms_sender",
                "sms_inbox_date",
                "transaction"
            ])
            .prop_map(str::to_string),
            "[a-z_]{1,16}",
        ],
        json_value(),
        0..8,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    prop_oneof![
        proptest::collection::vec(entry, 0..16).prop_map(|e| json!({"extracted_sms_data": e})),
        json_value().prop_map(|v| json!({"extracted_sms_data": v})),
        json_value().prop_map(|v| json!({"detail": v})),
        tricky_string().prop_map(|s| json!({"error": s})),
        json_value(),
    ]
    .prop_map(|v| to_bytes(&v))
}

fn valid_credeau_data() -> Vec<u8> {
    to_bytes(&json!({"extracted_sms_data": [
        {"sms_id": "1", "sms_sender": "AX-HDFCBK", "sms_body": "a/c xx1234 debited by inr 500.00",
         "sms_inbox_date": "2024-01-15 10:20:30", "transaction": true, "is_classified": 1},
        {"sms_id": "2", "sms_body": "otp 1234", "unique_pan_nlp": null}
    ]}))
}

#[test]
fn credeau_response_mapper_survives_arbitrary_and_mutated_bodies() {
    let body = prop_oneof![
        arbitrary_bytes(),
        credeau_body(),
        mutated(valid_credeau_data()),
        mutated(b"<html><body>403 Forbidden</body></html>".to_vec()),
    ];
    fuzz(
        "credeau_map_response",
        (status(), content_type(), body),
        |(st, ct, body), figures| {
            let (result, took, heap) = measured(|| credeau::map_response(*st, ct.as_deref(), body));
            figures.record(body.len(), took, heap, result.is_ok())?;
            match result {
                Ok(answer) => {
                    prop_assert!((200..300).contains(st), "answer {answer:?} for HTTP {st}");
                    if let CredeauAnswer::Data(sms) = answer {
                        prop_assert!(!sms.entries.is_empty());
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.provider, Provider::Credeau);
                    prop_assert!(
                        e.message.chars().count() <= 1024,
                        "message of {} chars",
                        e.message.len()
                    );
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- task records

fn valid_task() -> Task {
    Task {
        v: TASK_VERSION,
        user: OnboardedUser {
            event_id: "ev-1".into(),
            user_id: "user-1".into(),
            finbox_customer_id: "user-1".into(),
            credeau_user_id: "user-1".into(),
            onboarded_at: 1_750_000_000_000,
        },
        origin: SourceRef {
            topic: "users.onboarded".into(),
            partition: 3,
            offset: 42,
        },
        created_at: 1_750_000_000_000,
        due_at: 1_750_000_030_000,
        finbox: ProviderTrack::pending(1_750_000_030_000, 10_000),
        credeau: ProviderTrack::pending(1_750_000_030_000, 15_000),
        replay_of: None,
    }
}

/// A valid task's JSON with one value anywhere replaced by anything.
fn task_with_replaced_value() -> impl Strategy<Value = Vec<u8>> {
    let Ok(Value::Object(base)) = serde_json::to_value(valid_task()) else {
        unreachable!("a task serializes to an object");
    };
    let keys: Vec<String> = base.keys().cloned().collect();
    (proptest::sample::select(keys), json_value()).prop_map(move |(k, v)| {
        let mut m = base.clone();
        m.insert(k, v);
        to_bytes(&Value::Object(m))
    })
}

#[test]
fn task_decoder_survives_arbitrary_and_mutated_records() {
    let strategy = prop_oneof![
        arbitrary_bytes(),
        mutated(valid_task().encode()),
        task_with_replaced_value(),
        json_value().prop_map(|v| to_bytes(&v)),
    ];
    fuzz("task_decode", strategy, |bytes, figures| {
        let (result, took, heap) = measured(|| Task::decode(bytes));
        figures.record(bytes.len(), took, heap, result.is_ok())?;
        if let Ok(task) = result {
            prop_assert_eq!(task.v, TASK_VERSION);
            // What was accepted survives its own round trip unchanged.
            prop_assert_eq!(Task::decode(&task.encode()).ok(), Some(task));
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- large inputs

/// One decoder applied to one input; true when it accepted it.
type Run<'a> = Box<dyn Fn() -> bool + 'a>;

/// Inputs of several megabytes, benign and hostile: each decoder returns
/// within the time bound, holding heap in proportion to the input.
#[test]
fn multi_megabyte_inputs_complete_within_time_and_heap_bounds() {
    let rt = runtime();
    let mb = 1 << 20;
    let mut noise = vec![0u8; 4 * mb];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let deep = "[".repeat(4 * mb).into_bytes();
    let long_string = format!("{{\"user_id\": \"{}\"}}", "u".repeat(4 * mb)).into_bytes();
    let predictors: Vec<Value> = (0..60_000)
        .map(|i| json!({"name": format!("p{i}"), "value": i}))
        .collect();
    let finbox_big = to_bytes(&json!({"status": "complete", "data": predictors}));
    let sms: Vec<Value> = (0..5000)
        .map(|i| json!({"sms_id": i.to_string(), "sms_body": "x".repeat(400), "sms_sender": "AX-BANK"}))
        .collect();
    let credeau_big = to_bytes(&json!({"extracted_sms_data": sms}));
    let mut avro_claims = Vec::new();
    put_wire_header(&mut avro_claims, 2);
    put_str(&mut avro_claims, "ev-1");
    put_str(&mut avro_claims, "user-1");
    put_long(&mut avro_claims, 1_750_000_000_000);
    put_long(&mut avro_claims, i64::MAX / 2); // an array count of 2^62
    avro_claims.extend_from_slice(&noise[..mb]);

    let registry = Arc::new(RegistryClient::new(registry_url()).expect("registry client"));
    let json_decoder = InputDecoder::new(InputEncoding::Json, None).with_max_input_bytes(16 * mb);
    let avro_decoder =
        InputDecoder::new(InputEncoding::Avro, Some(registry)).with_max_input_bytes(16 * mb);

    let inputs: Vec<(&str, &[u8])> = vec![
        ("noise", &noise),
        ("deep nesting", &deep),
        ("long string", &long_string),
        ("60k predictors", &finbox_big),
        ("5000 SMS", &credeau_big),
        ("avro claiming 2^62 items", &avro_claims),
    ];
    let mut figures = Figures::default();
    for (name, input) in &inputs {
        let runs: [(&str, Run<'_>); 5] = [
            (
                "json input",
                Box::new(|| rt.block_on(json_decoder.decode(Some(input))).is_ok()),
            ),
            (
                "avro input",
                Box::new(|| rt.block_on(avro_decoder.decode(Some(input))).is_ok()),
            ),
            (
                "finbox",
                Box::new(|| finbox::map_response(200, Some("application/json"), input).is_ok()),
            ),
            (
                "credeau",
                Box::new(|| credeau::map_response(200, Some("application/json"), input).is_ok()),
            ),
            ("task", Box::new(|| Task::decode(input).is_ok())),
        ];
        for (target, run) in runs {
            let (ok, took, heap) = measured(run);
            eprintln!(
                "large {name} ({} KiB) -> {target}: {took:?}, heap {} KiB, accepted {ok}",
                input.len() / 1024,
                heap / 1024
            );
            if let Err(e) = figures.record(input.len(), took, heap, ok) {
                panic!("{name} -> {target}: {e}");
            }
        }
    }
    // The well-formed provider bodies are accepted whole.
    assert!(matches!(
        finbox::map_response(200, Some("application/json"), &finbox_big),
        Ok(FinboxAnswer::Complete(ref i)) if i.predictors.len() == 60_000
    ));
    assert!(matches!(
        credeau::map_response(200, Some("application/json"), &credeau_big),
        Ok(CredeauAnswer::Data(ref s)) if s.entries.len() == 5000
    ));
}
