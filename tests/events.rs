//! Round trips of the event contract over real HTTP to the run's schema
//! registry (TEST_SCHEMA_REGISTRY, Apicurio's Confluent API): input
//! decoding (JSON and Avro, valid and poison), and every output event
//! decoded back with apache-avro against the schema the encoder registered.
//! Two tests use the in-process `FakeRegistry` instead, for what the real
//! one cannot do at a test's command: count the reads of a schema (the
//! client's cache) and go down mid-test (an outage) without disturbing the
//! other tests that share it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use apache_avro::types::Value as Av;
use apache_avro::Schema;
use insights_enricher::config::{InputEncoding, OutputEncoding, TopicSettings};
use insights_enricher::events::avro::EventSchema;
use insights_enricher::events::{
    DecodeError, EncodeError, InputDecoder, OutputEncoder, RegistryClient,
};
use insights_enricher::providers::{
    FinboxInsights, Predictor, ProviderErrorKind, SmsEntry, SmsExtraction,
};
use insights_enricher::task::{
    Done, LastError, OnboardedUser, Outcome, ProviderTrack, SourceRef, Task, TASK_VERSION,
};
use serde_json::{json, Map, Value};

mod common;
use common::{confluent_wire as framed, register_schema, unique, FakeRegistry, Registry};

// ---------------------------------------------------------------- registry

/// The run's real registry. Writer schemas are registered under a subject
/// of their own, as another producer's would be.
struct Real {
    url: String,
}

impl Real {
    async fn add(&self, schema: &str) -> u32 {
        let subject = format!("{}-value", unique("events"));
        register_schema(&self.url, &subject, schema).await
    }
}

fn real_registry() -> (Real, Arc<RegistryClient>) {
    let url = Registry::start().url;
    let client = RegistryClient::new(&url).unwrap();
    (Real { url }, Arc::new(client))
}

/// The in-process fake: only for counting reads and for an outage.
async fn start_registry() -> (Arc<FakeRegistry>, Arc<RegistryClient>) {
    let state = Arc::new(FakeRegistry::default());
    let url = state.serve().await;
    let client = RegistryClient::new(&format!("{url}/")).unwrap();
    (state, Arc::new(client))
}

// ------------------------------------------------------------------ input

const T0: i64 = 1_758_868_469_000; // 2025-09-26T06:34:29Z

fn json_decoder() -> InputDecoder {
    InputDecoder::new(InputEncoding::Json, None)
}

async fn decode_json(v: Value) -> Result<insights_enricher::events::UserOnboarded, DecodeError> {
    json_decoder().decode(Some(v.to_string().as_bytes())).await
}

#[tokio::test]
async fn json_event_with_rfc3339_time_and_overrides_decodes() {
    let ev = decode_json(json!({
        "event_id": "ev-1",
        "user_id": "user_01.a:b-c",
        "onboarded_at": "2025-09-26T12:04:29+05:30",
        "finbox_customer_id": "FB-77",
        "credeau_user_id": "cr_77",
        "some_future_field": {"nested": [1, 2]}
    }))
    .await
    .unwrap();
    assert_eq!(ev.event_id, "ev-1");
    assert_eq!(ev.onboarded_at, T0);
    let user = ev.into_user();
    assert_eq!(user.user_id, "user_01.a:b-c");
    assert_eq!(user.finbox_customer_id, "FB-77");
    assert_eq!(user.credeau_user_id, "cr_77");
}

#[tokio::test]
async fn json_event_with_epoch_millis_defaults_provider_ids_to_user_id() {
    let ev = decode_json(json!({"event_id": "e", "user_id": "u1", "onboarded_at": T0}))
        .await
        .unwrap();
    assert_eq!(ev.onboarded_at, T0);
    assert_eq!(ev.finbox_customer_id, None);
    let user = ev.into_user();
    assert_eq!(user.finbox_customer_id, "u1");
    assert_eq!(user.credeau_user_id, "u1");
    assert_eq!(user.onboarded_at, T0);
}

#[tokio::test]
async fn json_poison_records_give_the_matching_error() {
    let d = json_decoder();
    /// (case, record value, expected reason, expected invalid field)
    type Case = (
        &'static str,
        Option<Vec<u8>>,
        &'static str,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        ("no value", None, "empty", None),
        ("zero bytes", Some(vec![]), "empty", None),
        ("malformed", Some(b"{\"event_id\": \"e\", ".to_vec()), "malformed_json", None),
        ("not an object", Some(b"[1,2,3]".to_vec()), "malformed_json", None),
        ("invalid utf-8", Some(b"{\"user_id\": \"\xff\xfe\"}".to_vec()), "not_utf8", None),
        (
            "missing user_id",
            Some(json!({"event_id": "e", "onboarded_at": T0}).to_string().into_bytes()),
            "invalid_field",
            Some("user_id"),
        ),
        (
            "user_id of 65 chars",
            Some(
                json!({"event_id": "e", "user_id": "u".repeat(65), "onboarded_at": T0})
                    .to_string()
                    .into_bytes(),
            ),
            "invalid_field",
            Some("user_id"),
        ),
        (
            "user_id with a space",
            Some(json!({"event_id": "e", "user_id": "a b", "onboarded_at": T0}).to_string().into_bytes()),
            "invalid_field",
            Some("user_id"),
        ),
        (
            "user_id not a string",
            Some(json!({"event_id": "e", "user_id": 5, "onboarded_at": T0}).to_string().into_bytes()),
            "invalid_field",
            Some("user_id"),
        ),
        (
            "override too long",
            Some(
                json!({"event_id": "e", "user_id": "u", "onboarded_at": T0, "credeau_user_id": "c".repeat(65)})
                    .to_string()
                    .into_bytes(),
            ),
            "invalid_field",
            Some("credeau_user_id"),
        ),
        (
            "event_id of 129 chars",
            Some(json!({"event_id": "e".repeat(129), "user_id": "u", "onboarded_at": T0}).to_string().into_bytes()),
            "invalid_field",
            Some("event_id"),
        ),
        (
            "onboarded_at in seconds",
            Some(json!({"event_id": "e", "user_id": "u", "onboarded_at": T0 / 1000}).to_string().into_bytes()),
            "invalid_field",
            Some("onboarded_at"),
        ),
        (
            "onboarded_at not a time",
            Some(json!({"event_id": "e", "user_id": "u", "onboarded_at": "yesterday"}).to_string().into_bytes()),
            "invalid_field",
            Some("onboarded_at"),
        ),
        (
            "2 MB of JSON garbage",
            Some(vec![b'{'; 2 * 1024 * 1024]),
            "invalid_field",
            Some("value"),
        ),
        (
            "2 MB string field",
            Some(
                json!({"event_id": "e", "user_id": "x".repeat(2 * 1024 * 1024), "onboarded_at": T0})
                    .to_string()
                    .into_bytes(),
            ),
            "invalid_field",
            Some("value"),
        ),
    ];
    for (name, value, reason, field) in cases {
        let err = d.decode(value.as_deref()).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{name}: {err}");
        assert!(!err.is_transient(), "{name}");
        if let Some(f) = field {
            assert!(
                matches!(&err, DecodeError::Invalid { field, .. } if *field == f),
                "{name}: {err:?}"
            );
        }
        let text = err.to_string();
        assert!(text.len() < 400, "{name}: message of {} bytes", text.len());
        assert!(!text.contains(&"u".repeat(65)), "{name}: {text}");
    }
}

#[tokio::test]
async fn a_huge_string_within_the_cap_is_bounded_in_the_error_message() {
    let big = "é".repeat(300_000);
    let err = decode_json(json!({"event_id": "e", "user_id": big, "onboarded_at": T0}))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "invalid_field");
    assert!(err.to_string().len() < 400, "{err}");
}

#[tokio::test]
async fn the_input_cap_is_configurable() {
    let d = InputDecoder::new(InputEncoding::Json, None).with_max_input_bytes(64);
    let v = json!({"event_id": "e".repeat(60), "user_id": "u", "onboarded_at": T0}).to_string();
    let err = d.decode(Some(v.as_bytes())).await.unwrap_err();
    assert!(
        matches!(err, DecodeError::Invalid { field: "value", .. }),
        "{err:?}"
    );
}

fn onboarded_avro(schema: &Schema, user_id: &str, extra: Option<(&str, Av)>) -> Vec<u8> {
    let mut fields = vec![
        ("event_id".to_string(), Av::String("ev-9".into())),
        ("user_id".to_string(), Av::String(user_id.into())),
        ("onboarded_at".to_string(), Av::TimestampMillis(T0)),
        (
            "finbox_customer_id".to_string(),
            Av::Union(1, Box::new(Av::String("FB-9".into()))),
        ),
        (
            "credeau_user_id".to_string(),
            Av::Union(0, Box::new(Av::Null)),
        ),
    ];
    if let Some((name, v)) = extra {
        fields.push((name.to_string(), v));
    }
    apache_avro::to_avro_datum(schema, Av::Record(fields)).unwrap()
}

#[tokio::test]
async fn avro_event_decodes_in_avro_and_auto_modes_and_the_schema_is_fetched_once() {
    let (reg, client) = start_registry().await;
    let text = EventSchema::UserOnboarded.text();
    let id = reg.add(text);
    let value = framed(
        id,
        &onboarded_avro(&Schema::parse_str(text).unwrap(), "u-9", None),
    );
    for enc in [InputEncoding::Avro, InputEncoding::Auto] {
        let d = InputDecoder::new(enc, Some(Arc::clone(&client)));
        let ev = d.decode(Some(&value)).await.unwrap();
        assert_eq!(ev.event_id, "ev-9");
        assert_eq!(ev.user_id, "u-9");
        assert_eq!(ev.onboarded_at, T0);
        assert_eq!(ev.finbox_customer_id.as_deref(), Some("FB-9"));
        assert_eq!(ev.credeau_user_id, None);
    }
    assert_eq!(reg.gets.load(Ordering::SeqCst), 1, "schema cached by id");
}

#[tokio::test]
async fn avro_writer_with_an_extra_field_resolves_against_our_reader_schema() {
    let (reg, client) = real_registry();
    let mut writer: Value = serde_json::from_str(EventSchema::UserOnboarded.text()).unwrap();
    writer["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "channel", "type": "string"}));
    let writer_text = writer.to_string();
    let id = reg.add(&writer_text).await;
    let datum = onboarded_avro(
        &Schema::parse_str(&writer_text).unwrap(),
        "u-10",
        Some(("channel", Av::String("android".into()))),
    );
    let d = InputDecoder::new(InputEncoding::Auto, Some(client));
    let ev = d.decode(Some(&framed(id, &datum))).await.unwrap();
    assert_eq!(ev.user_id, "u-10");
    assert_eq!(ev.finbox_customer_id.as_deref(), Some("FB-9"));
}

#[tokio::test]
async fn avro_writer_without_the_optional_fields_resolves_to_their_defaults() {
    let (reg, client) = real_registry();
    let mut writer: Value = serde_json::from_str(EventSchema::UserOnboarded.text()).unwrap();
    writer["fields"].as_array_mut().unwrap().truncate(3);
    let writer_text = writer.to_string();
    let id = reg.add(&writer_text).await;
    let datum = apache_avro::to_avro_datum(
        &Schema::parse_str(&writer_text).unwrap(),
        Av::Record(vec![
            ("event_id".into(), Av::String("e".into())),
            ("user_id".into(), Av::String("u".into())),
            ("onboarded_at".into(), Av::TimestampMillis(T0)),
        ]),
    )
    .unwrap();
    let d = InputDecoder::new(InputEncoding::Avro, Some(client));
    let ev = d.decode(Some(&framed(id, &datum))).await.unwrap();
    assert_eq!((ev.finbox_customer_id, ev.credeau_user_id), (None, None));
}

#[tokio::test]
async fn avro_poison_records_give_the_matching_error() {
    let (reg, client) = real_registry();
    let text = EventSchema::UserOnboarded.text();
    let id = reg.add(text).await;
    let schema = Schema::parse_str(text).unwrap();
    let d = InputDecoder::new(InputEncoding::Auto, Some(Arc::clone(&client)));

    // Known id, garbage datum: a string length far past the end, then noise.
    let garbage = framed(id, &[0xfe, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]);
    let err = d.decode(Some(&garbage)).await.unwrap_err();
    assert_eq!(err.reason(), "invalid_avro", "{err}");

    // A valid datum followed by junk is not silently accepted.
    let mut trailing = framed(id, &onboarded_avro(&schema, "u", None));
    trailing.extend_from_slice(b"junk");
    let err = d.decode(Some(&trailing)).await.unwrap_err();
    assert_eq!(err.reason(), "invalid_avro", "{err}");

    let err = d.decode(Some(&framed(4242, b"\x02a"))).await.unwrap_err();
    assert_eq!(err, DecodeError::UnknownSchemaId(4242));
    assert!(!err.is_transient());

    // Valid Avro, but the user_id breaks the rules.
    let long_id = framed(id, &onboarded_avro(&schema, &"u".repeat(65), None));
    let err = d.decode(Some(&long_id)).await.unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Invalid {
                field: "user_id",
                ..
            }
        ),
        "{err:?}"
    );

    // Magic byte without a full schema id.
    let err = d.decode(Some(&[0, 0, 1])).await.unwrap_err();
    assert_eq!(err.reason(), "invalid_avro");

    // In JSON mode, Avro bytes are simply not JSON.
    let err = json_decoder().decode(Some(&garbage)).await.unwrap_err();
    assert!(
        matches!(err.reason(), "malformed_json" | "not_utf8"),
        "{err}"
    );

    // Avro arriving with no registry configured cannot be read, ever.
    let err = InputDecoder::new(InputEncoding::Auto, None)
        .decode(Some(&garbage))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "invalid_avro");
}

#[tokio::test]
async fn a_registry_outage_is_transient() {
    let (reg, client) = start_registry().await;
    let id = reg.add(EventSchema::UserOnboarded.text());
    reg.down.store(true, Ordering::SeqCst);
    let d = InputDecoder::new(InputEncoding::Avro, Some(client));
    let err = d.decode(Some(&framed(id, b"\x02e"))).await.unwrap_err();
    assert_eq!(err.reason(), "registry_unavailable", "{err}");
    assert!(err.is_transient());

    let unreachable = Arc::new(RegistryClient::new("http://127.0.0.1:1").unwrap());
    let d = InputDecoder::new(InputEncoding::Avro, Some(unreachable));
    let err = d.decode(Some(&framed(id, b"\x02e"))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

// ----------------------------------------------------------------- output

fn topics() -> TopicSettings {
    TopicSettings {
        input: "users.onboarded".into(),
        finbox_predictors: "insights.finbox.predictors".into(),
        sms_extraction: "insights.credeau.sms".into(),
        combined: "insights.ready".into(),
        dead_letter: "dlq".into(),
        delay_prefix: "delay".into(),
        create: false,
        partitions: 1,
        replication_factor: 1,
        max_message_bytes: 8 * 1024 * 1024,
    }
}

fn task() -> Task {
    Task {
        v: TASK_VERSION,
        user: OnboardedUser {
            event_id: "ev-1".into(),
            user_id: "u-1".into(),
            finbox_customer_id: "FB-1".into(),
            credeau_user_id: "CR-1".into(),
            onboarded_at: T0,
        },
        origin: SourceRef {
            topic: "users.onboarded".into(),
            partition: 0,
            offset: 3,
        },
        created_at: T0,
        due_at: T0,
        finbox: ProviderTrack::pending(T0, 10_000),
        credeau: ProviderTrack::pending(T0, 15_000),
        replay_of: None,
    }
}

async fn avro_encoder() -> (Real, Arc<RegistryClient>, OutputEncoder) {
    let (reg, client) = real_registry();
    let enc = OutputEncoder::new(OutputEncoding::Avro, Some(Arc::clone(&client)), &topics())
        .await
        .unwrap();
    (reg, client, enc)
}

/// Decodes a Confluent-framed value with the schema its id names in the
/// registry, checking the whole datum is consumed.
async fn decode_output(client: &RegistryClient, value: &[u8]) -> Av {
    assert_eq!(value[0], 0);
    let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
    let schema = client.schema_by_id(id).await.unwrap();
    let mut datum = &value[5..];
    let v = apache_avro::from_avro_datum(&schema, &mut datum, None).unwrap();
    assert!(datum.is_empty(), "{} trailing bytes", datum.len());
    v
}

fn field<'a>(v: &'a Av, name: &str) -> &'a Av {
    let Av::Record(fields) = v else {
        panic!("not a record: {v:?}")
    };
    let v = &fields
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1;
    match v {
        Av::Union(_, inner) => inner,
        v => v,
    }
}

fn s(v: &str) -> Av {
    Av::String(v.into())
}

#[tokio::test]
async fn avro_output_registers_one_subject_per_output_topic() {
    let (reg, _client, enc) = avro_encoder().await;
    let ids = enc.schema_ids().unwrap();
    for (subject, id) in [
        ("insights.credeau.sms-value", ids.sms_extraction),
        ("insights.finbox.predictors-value", ids.finbox_predictors),
        ("insights.ready-value", ids.insights_ready),
    ] {
        let latest: Value = reqwest::get(format!("{}/subjects/{subject}/versions/latest", reg.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(latest["id"], id, "{subject}: {latest}");
    }
}

#[tokio::test]
async fn avro_output_without_a_registry_is_refused() {
    let err = OutputEncoder::new(OutputEncoding::Avro, None, &topics())
        .await
        .unwrap_err();
    assert!(matches!(err, EncodeError::NoRegistry));
}

fn insights() -> FinboxInsights {
    let p = |name: &str, value: Value| Predictor {
        name: name.into(),
        value,
        ..Default::default()
    };
    let mut with_extra = p("n_str", json!("high"));
    with_extra.extra = json!({"type": "label", "weight": 0.5})
        .as_object()
        .unwrap()
        .clone();
    FinboxInsights {
        request_id: Some("abcd-def-dfdf-jjj1".into()),
        date_requested: Some("2019-01-03T06:37:44:003".into()),
        date_processed: Some("2019-01-03T06:37:44:221".into()),
        message: Some("data processed successfully".into()),
        version: Some(3),
        predictors: vec![
            p("n_null", json!(null)),
            p("n_bool", json!(true)),
            p("n_long", json!(42)),
            p("n_double", json!(0.25)),
            with_extra,
            p("n_obj", json!({"a": [1, 2]})),
        ],
        data_json: Some(r#"[{"name": "n_null", "value": null}, {"k": 1}]"#.into()),
        data_problem: Some("1 of 2 ...".into()),
        customer_id: Some("FB-1".into()),
        answered_version: Some(4),
        response_json: Some(r#"{"score":712}"#.into()),
    }
}

#[tokio::test]
async fn finbox_predictors_round_trip_through_avro() {
    let (_reg, client, enc) = avro_encoder().await;
    let value = enc.finbox_predictors(&task(), &insights(), T0 + 5).unwrap();
    let v = decode_output(&client, &value).await;
    assert_eq!(field(&v, "event_id"), &s("ev-1"));
    assert_eq!(field(&v, "user_id"), &s("u-1"));
    assert_eq!(field(&v, "finbox_customer_id"), &s("FB-1"));
    assert_eq!(field(&v, "onboarded_at"), &Av::TimestampMillis(T0));
    assert_eq!(field(&v, "fetched_at"), &Av::TimestampMillis(T0 + 5));
    assert_eq!(field(&v, "request_id"), &s("abcd-def-dfdf-jjj1"));
    assert_eq!(field(&v, "date_requested"), &s("2019-01-03T06:37:44:003"));
    assert_eq!(field(&v, "date_processed"), &s("2019-01-03T06:37:44:221"));
    assert_eq!(
        field(&v, "date_processed_at"),
        &Av::TimestampMillis(1_546_497_464_221)
    );
    let Av::Array(items) = field(&v, "predictors") else {
        panic!()
    };
    let got: Vec<(Av, Av)> = items
        .iter()
        .map(|p| (field(p, "name").clone(), field(p, "value").clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (s("n_null"), Av::Null),
            (s("n_bool"), Av::Boolean(true)),
            (s("n_long"), Av::Long(42)),
            (s("n_double"), Av::Double(0.25)),
            (s("n_str"), s("high")),
            (s("n_obj"), s("{\"a\":[1,2]}")),
        ]
    );
    assert_eq!(field(&items[0], "extra"), &Av::Map(Default::default()));
    assert_eq!(
        field(&items[4], "extra"),
        &Av::Map(
            [("type".into(), s("\"label\"")), ("weight".into(), s("0.5"))]
                .into_iter()
                .collect()
        )
    );
    assert_eq!(field(&v, "version"), &Av::Long(3));
    assert_eq!(field(&v, "message"), &s("data processed successfully"));
    assert_eq!(
        field(&v, "data_json"),
        &s(r#"[{"name": "n_null", "value": null}, {"k": 1}]"#)
    );
    assert_eq!(field(&v, "data_problem"), &s("1 of 2 ..."));
    assert_eq!(field(&v, "answered_customer_id"), &s("FB-1"));
    assert_eq!(field(&v, "answered_version"), &Av::Long(4));
    assert_eq!(field(&v, "response_json"), &s(r#"{"score":712}"#));
}

#[tokio::test]
async fn finbox_predictors_in_json_use_the_same_fields() {
    let enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let mut ins = insights();
    ins.date_processed = Some("not a date".into());
    let v: Value =
        serde_json::from_slice(&enc.finbox_predictors(&task(), &ins, T0 + 5).unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "event_id": "ev-1", "user_id": "u-1", "finbox_customer_id": "FB-1",
            "onboarded_at": T0, "fetched_at": T0 + 5,
            "request_id": "abcd-def-dfdf-jjj1",
            "date_requested": "2019-01-03T06:37:44:003",
            "date_processed": "not a date", "date_processed_at": null,
            "predictors": [
                {"name": "n_null", "value": null, "extra": {}},
                {"name": "n_bool", "value": true, "extra": {}},
                {"name": "n_long", "value": 42, "extra": {}},
                {"name": "n_double", "value": 0.25, "extra": {}},
                {"name": "n_str", "value": "high", "extra": {"type": "\"label\"", "weight": "0.5"}},
                {"name": "n_obj", "value": "{\"a\":[1,2]}", "extra": {}}
            ],
            "version": 3, "message": "data processed successfully",
            "data_json": "[{\"name\": \"n_null\", \"value\": null}, {\"k\": 1}]",
            "data_problem": "1 of 2 ...",
            "answered_customer_id": "FB-1", "answered_version": 4,
            "response_json": "{\"score\":712}"
        })
    );
}

/// One entry with a lone surrogate escape (an emoji cut in half) and a
/// number beyond double range: JSON text, but no Avro string or double
/// holds them as sent.
const ODD_ENTRY: &str = r#"{"_id": "odd-1", "user_id": "u-1", "sms_id": "77", "sms_body": "paid \ud83d", "transaction": 1e400, "is_extracted": true}"#;

#[tokio::test]
async fn an_sms_entry_avro_cannot_hold_as_sent_keeps_its_text_in_extra_and_the_rest_typed() {
    let (_reg, client, enc) = avro_encoder().await;
    let odd = SmsEntry::from_json(ODD_ENTRY.to_string()).unwrap();
    let sms = SmsExtraction {
        entries: vec![as_entry(seed_entry(1)), odd],
        cnt_sms_threshold: Some(5000),
        ..Default::default()
    };
    let parts = enc
        .sms_extraction(&task(), &sms, T0 + 9, 1 << 20)
        .expect("one odd value does not fail the extraction");
    assert_eq!(parts.len(), 1);
    let v = decode_output(&client, &parts[0]).await;
    assert_eq!(field(&v, "total_sms"), &Av::Int(2));
    let Av::Array(entries) = field(&v, "entries") else {
        panic!()
    };
    let odd = &entries[1];
    let opt = |name: &str| match field(odd, name) {
        Av::Union(_, inner) => (**inner).clone(),
        other => other.clone(),
    };
    assert_eq!(opt("sms_id"), s("77"));
    assert_eq!(opt("is_extracted"), Av::Boolean(true));
    assert_eq!(opt("sms_body"), s("paid \u{fffd}"));
    assert_eq!(opt("transaction"), Av::Null, "not a double: in extra");
    let Av::Map(extra) = field(odd, "extra") else {
        panic!()
    };
    assert_eq!(extra.get("transaction"), Some(&s("\"1e400\"")));
    let Some(Av::String(as_sent)) = extra.get("_entry_json") else {
        panic!("{extra:?}")
    };
    let as_sent: String = serde_json::from_str(as_sent).unwrap();
    assert_eq!(as_sent, ODD_ENTRY, "the entry exactly as Credeau sent it");
    // JSON output carries the same entry byte for byte.
    let json_enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let parts = json_enc
        .sms_extraction(&task(), &sms, T0 + 9, 1 << 20)
        .unwrap();
    assert!(String::from_utf8(parts[0].clone())
        .unwrap()
        .contains(ODD_ENTRY));
}

/// The first entry of Credeau's documented example, plus a field Credeau
/// might add tomorrow and a typed field with an unexpected type.
fn seed_entry(i: usize) -> Map<String, Value> {
    let v = json!({
        "_id": format!("68d64205e4a336675ab7{i:05}"),
        "user_id": "CR-1",
        "client_id": "lender",
        "request_id": "9c8d583b51334515a6ae3dfe8cb333ce",
        "sms_id": format!("{i}"),
        "sms_sender": "sbiupi",
        "sms_inbox_date": "2025-09-22 16:27:01",
        "sms_body": "dear upi user a/c x3028 debited by 80.0 on date 22sep25 trf to vinod kumar sah refno 000000642062 if not u? call-0000001109 for other services-18001234-sbi",
        "created_at": "2025-09-26 07:34:29",
        "created_date": "2025-09-26",
        "template_hash": "1866580b-277c-4391-be9f-a54891c84acc",
        "is_classified": true,
        "is_extracted": true,
        "account_last_digits": "3028",
        "transaction": 80.0,
        "transaction_party": "vinod kumar sah",
        "sms_sub_type": "bank",
        "sms_type": "account_debit_executed",
        "sender_name": "state bank of india",
        "sender_type": "bank",
        "sms_nlp_tag": "account_debit_executed_transfer_out",
        "unique_pan": "bank | state bank of india | 28",
        "is_transactional": true,
        "transaction_type": "debit-transaction",
        "acc_number_nlp": "x3028",
        "transaction_nlp": 80,
        "unique_pan_nlp": "bank | state bank of india | 28",
        "merchant_category": {"code": 5411, "name": "grocery"},
        "is_extracted_v2": null
    });
    serde_json::from_value(v).unwrap()
}

/// An entry as the Credeau client keeps it: the JSON text of the object.
fn as_entry(m: Map<String, Value>) -> SmsEntry {
    SmsEntry::from_json(Value::Object(m).to_string()).unwrap()
}

#[tokio::test]
async fn sms_extraction_round_trips_through_avro_with_unknown_fields_in_extra() {
    let (_reg, client, enc) = avro_encoder().await;
    let mut odd = seed_entry(2);
    odd.insert("transaction".into(), json!("80 rupees"));
    let sms = SmsExtraction {
        entries: vec![as_entry(seed_entry(1)), as_entry(odd)],
        cnt_sms_threshold: Some(5000),
        ..Default::default()
    };
    let parts = enc.sms_extraction(&task(), &sms, T0 + 9, 1 << 20).unwrap();
    assert_eq!(parts.len(), 1);
    let v = decode_output(&client, &parts[0]).await;
    assert_eq!(field(&v, "event_id"), &s("ev-1"));
    assert_eq!(field(&v, "user_id"), &s("u-1"));
    assert_eq!(field(&v, "credeau_user_id"), &s("CR-1"));
    assert_eq!(field(&v, "onboarded_at"), &Av::TimestampMillis(T0));
    assert_eq!(field(&v, "fetched_at"), &Av::TimestampMillis(T0 + 9));
    assert_eq!(field(&v, "part"), &Av::Int(1));
    assert_eq!(field(&v, "parts"), &Av::Int(1));
    assert_eq!(field(&v, "total_sms"), &Av::Int(2));
    assert_eq!(field(&v, "cnt_sms_threshold"), &Av::Int(5000));
    let Av::Array(entries) = field(&v, "entries") else {
        panic!()
    };
    assert_eq!(entries.len(), 2);

    let e = &entries[0];
    let src = seed_entry(1);
    assert_eq!(field(e, "id"), &s(src["_id"].as_str().unwrap()));
    for (name, kind) in [
        ("sms_id", "s"),
        ("sms_sender", "s"),
        ("sms_inbox_date", "s"),
        ("sms_body", "s"),
        ("created_at", "s"),
        ("created_date", "s"),
        ("template_hash", "s"),
        ("is_classified", "b"),
        ("is_extracted", "b"),
        ("account_last_digits", "s"),
        ("transaction", "d"),
        ("transaction_party", "s"),
        ("sms_sub_type", "s"),
        ("sms_type", "s"),
        ("sender_name", "s"),
        ("sender_type", "s"),
        ("sms_nlp_tag", "s"),
        ("unique_pan", "s"),
        ("is_transactional", "b"),
        ("transaction_type", "s"),
        ("acc_number_nlp", "s"),
        ("transaction_nlp", "d"),
        ("unique_pan_nlp", "s"),
        ("request_id", "s"),
    ] {
        let expected = match kind {
            "s" => s(src[name].as_str().unwrap()),
            "b" => Av::Boolean(src[name].as_bool().unwrap()),
            _ => Av::Double(src[name].as_f64().unwrap()),
        };
        assert_eq!(field(e, name), &expected, "{name}");
    }
    let Av::Map(extra) = field(e, "extra") else {
        panic!()
    };
    let mut extra: Vec<(&String, &Av)> = extra.iter().collect();
    extra.sort_by_key(|(k, _)| k.as_str());
    assert_eq!(
        extra,
        vec![
            (&"client_id".to_string(), &s("\"lender\"")),
            (&"is_extracted_v2".to_string(), &s("null")),
            (
                &"merchant_category".to_string(),
                &s("{\"code\":5411,\"name\":\"grocery\"}")
            ),
            (&"user_id".to_string(), &s("\"CR-1\"")),
        ]
    );

    let odd = &entries[1];
    assert_eq!(field(odd, "transaction"), &Av::Null);
    let Av::Map(extra) = field(odd, "extra") else {
        panic!()
    };
    assert_eq!(extra["transaction"], s("\"80 rupees\""));
}

#[tokio::test]
async fn sms_extraction_in_json_keeps_the_provider_entries_unchanged() {
    let enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let sms = SmsExtraction {
        entries: vec![as_entry(seed_entry(1)), as_entry(seed_entry(2))],
        cnt_sms_threshold: Some(2),
        ..Default::default()
    };
    let parts = enc.sms_extraction(&task(), &sms, T0 + 9, 1 << 20).unwrap();
    assert_eq!(parts.len(), 1);
    let v: Value = serde_json::from_slice(&parts[0]).unwrap();
    assert_eq!(v["event_id"], "ev-1");
    assert_eq!(v["user_id"], "u-1");
    assert_eq!(v["credeau_user_id"], "CR-1");
    assert_eq!(v["onboarded_at"], T0);
    assert_eq!(v["fetched_at"], T0 + 9);
    assert_eq!(
        (
            v["part"].clone(),
            v["parts"].clone(),
            v["total_sms"].clone()
        ),
        (json!(1), json!(1), json!(2))
    );
    assert_eq!(v["cnt_sms_threshold"], 2);
    let entries: Vec<Map<String, Value>> = serde_json::from_value(v["entries"].clone()).unwrap();
    assert_eq!(entries, vec![seed_entry(1), seed_entry(2)]);
    // Byte for byte: the entries' text is carried over, not encoded again.
    let text = String::from_utf8(parts[0].clone()).unwrap();
    let joined = format!("[{},{}]", sms.entries[0].get(), sms.entries[1].get());
    assert!(text.contains(&format!("\"entries\":{joined}")), "{text}");
}

async fn split_check(enc: &OutputEncoder, client: Option<&RegistryClient>) {
    let sms = SmsExtraction {
        entries: (0..40).map(|i| as_entry(seed_entry(i))).collect(),
        cnt_sms_threshold: Some(i32::MAX as u32),
        ..Default::default()
    };
    let max = 4096;
    let parts = enc.sms_extraction(&task(), &sms, T0, max).unwrap();
    assert!(parts.len() >= 5, "{} parts", parts.len());
    let mut ids = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        assert!(p.len() <= max, "part {} is {} bytes", i + 1, p.len());
        let (part, n, total, entries) = match client {
            Some(c) => {
                let v = decode_output(c, p).await;
                let Av::Array(es) = field(&v, "entries").clone() else {
                    panic!()
                };
                let ids: Vec<String> = es
                    .iter()
                    .map(|e| match field(e, "id") {
                        Av::String(s) => s.clone(),
                        o => panic!("{o:?}"),
                    })
                    .collect();
                (
                    field(&v, "part").clone(),
                    field(&v, "parts").clone(),
                    field(&v, "total_sms").clone(),
                    ids,
                )
            }
            None => {
                let v: Value = serde_json::from_slice(p).unwrap();
                let ids = v["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["_id"].as_str().unwrap().to_string())
                    .collect();
                let int = |k: &str| Av::Int(v[k].as_i64().unwrap() as i32);
                (int("part"), int("parts"), int("total_sms"), ids)
            }
        };
        assert_eq!(part, Av::Int(i as i32 + 1));
        assert_eq!(n, Av::Int(parts.len() as i32));
        assert_eq!(total, Av::Int(40));
        assert!(!entries.is_empty());
        ids.extend(entries);
    }
    let expected: Vec<String> = sms
        .entries
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.get()).unwrap();
            v["_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids, expected, "every entry exactly once, in order");

    let mut huge = seed_entry(0);
    huge.insert("sms_body".into(), json!("x".repeat(max)));
    let err = enc
        .sms_extraction(
            &task(),
            &SmsExtraction {
                entries: vec![as_entry(seed_entry(1)), as_entry(huge)],
                ..Default::default()
            },
            T0,
            max,
        )
        .unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLarge { entry: Some(1), .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("xxxx"), "no SMS text in errors");
}

#[tokio::test]
async fn sms_extraction_splits_into_numbered_parts_within_max_bytes_in_avro() {
    let (_reg, client, enc) = avro_encoder().await;
    split_check(&enc, Some(&client)).await;
}

#[tokio::test]
async fn sms_extraction_splits_into_numbered_parts_within_max_bytes_in_json() {
    let enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    split_check(&enc, None).await;
}

#[tokio::test]
async fn five_thousand_sms_fit_one_eight_mib_value_in_both_encodings() {
    let (_reg, client, avro) = avro_encoder().await;
    let json_enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let sms = SmsExtraction {
        entries: (0..5000).map(|i| as_entry(seed_entry(i))).collect(),
        cnt_sms_threshold: Some(5000),
        ..Default::default()
    };
    let raw: usize = sms
        .entries
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap().len())
        .sum();
    let max = 8 * 1024 * 1024;
    // Reference point: serde_json writing the entries, nothing else.
    let t = Instant::now();
    let plain = serde_json::to_vec(&sms.entries).unwrap();
    println!(
        "baseline: serde_json::to_vec of the entries: {} bytes in {:?}",
        plain.len(),
        t.elapsed()
    );
    for (name, enc) in [("json", &json_enc), ("avro", &avro)] {
        // Warm up once, then time the best of three.
        enc.sms_extraction(&task(), &sms, T0, max).unwrap();
        let mut best = std::time::Duration::MAX;
        let mut parts = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            parts = enc.sms_extraction(&task(), &sms, T0, max).unwrap();
            best = best.min(t.elapsed());
        }
        assert_eq!(parts.len(), 1, "{name}");
        assert!(parts[0].len() <= max, "{name}");
        println!(
            "{name}: 5000 SMS ({raw} bytes of provider JSON) -> {} bytes in {best:?}",
            parts[0].len()
        );
    }
    let parts = avro.sms_extraction(&task(), &sms, T0, max).unwrap();
    let v = decode_output(&client, &parts[0]).await;
    assert_eq!(field(&v, "total_sms"), &Av::Int(5000));
}

fn finished(outcome: Outcome, at: i64, items: Option<u32>) -> Option<Done> {
    Some(Done { outcome, at, items })
}

#[tokio::test]
async fn insights_ready_round_trips_through_avro_and_json() {
    let (_reg, client, avro) = avro_encoder().await;
    let json_enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let mut t = task();
    t.replay_of = Some("insights-enricher.dlq/0/17".into());
    t.finbox.polls = 4;
    t.finbox.first_poll_at = Some(T0 + 30_000);
    t.finbox.done = finished(Outcome::Complete, T0 + 90_000, Some(6));
    t.credeau.polls = 2;
    t.credeau.last_error = Some(LastError {
        kind: ProviderErrorKind::IdentityMismatch,
        http_status: Some(200),
        message: "answered for another user_id".into(),
        provider_request_id: Some("rq-1".into()),
        answered_id: Some("CR-2".into()),
    });
    t.finbox.data_problem = Some("`data` is an empty object".into());
    t.finbox.partial = true;
    t.credeau.done = finished(Outcome::Failed, T0 + 60_000, None);
    t.finbox.request_id = Some("abcd-def-dfdf-jjj1".into());

    let v = decode_output(&client, &avro.insights_ready(&t, T0 + 90_001).unwrap()).await;
    assert_eq!(field(&v, "event_id"), &s("ev-1"));
    assert_eq!(field(&v, "user_id"), &s("u-1"));
    assert_eq!(field(&v, "onboarded_at"), &Av::TimestampMillis(T0));
    assert_eq!(field(&v, "completed_at"), &Av::TimestampMillis(T0 + 90_001));
    assert_eq!(field(&v, "replay_of"), &s("insights-enricher.dlq/0/17"));
    let fb = field(&v, "finbox");
    assert_eq!(field(fb, "outcome"), &Av::Enum(0, "complete".into()));
    assert_eq!(field(fb, "polls"), &Av::Int(4));
    assert_eq!(
        field(fb, "first_poll_at"),
        &Av::TimestampMillis(T0 + 30_000)
    );
    assert_eq!(field(fb, "finished_at"), &Av::TimestampMillis(T0 + 90_000));
    assert_eq!(field(fb, "items"), &Av::Int(6));
    for k in [
        "error_kind",
        "http_status",
        "error_message",
        "provider_request_id",
    ] {
        assert_eq!(field(fb, k), &Av::Null, "{k}");
    }
    assert_eq!(field(fb, "request_id"), &s("abcd-def-dfdf-jjj1"));
    assert_eq!(field(fb, "answered_id"), &Av::Null);
    assert_eq!(field(fb, "data_problem"), &s("`data` is an empty object"));
    assert_eq!(field(fb, "partial"), &Av::Boolean(true));
    let cr = field(&v, "credeau");
    assert_eq!(field(cr, "outcome"), &Av::Enum(4, "failed".into()));
    assert_eq!(field(cr, "polls"), &Av::Int(2));
    assert_eq!(field(cr, "first_poll_at"), &Av::Null);
    assert_eq!(field(cr, "items"), &Av::Null);
    assert_eq!(field(cr, "error_kind"), &s("identity_mismatch"));
    assert_eq!(field(cr, "http_status"), &Av::Int(200));
    assert_eq!(
        field(cr, "error_message"),
        &s("answered for another user_id")
    );
    assert_eq!(field(cr, "provider_request_id"), &s("rq-1"));
    assert_eq!(field(cr, "request_id"), &Av::Null);
    assert_eq!(field(cr, "answered_id"), &s("CR-2"));
    assert_eq!(field(cr, "data_problem"), &Av::Null);
    assert_eq!(field(cr, "partial"), &Av::Boolean(false));

    let j: Value =
        serde_json::from_slice(&json_enc.insights_ready(&t, T0 + 90_001).unwrap()).unwrap();
    assert_eq!(
        j,
        json!({
            "event_id": "ev-1", "user_id": "u-1", "onboarded_at": T0, "completed_at": T0 + 90_001,
            "replay_of": "insights-enricher.dlq/0/17",
            "finbox": {"outcome": "complete", "polls": 4, "first_poll_at": T0 + 30_000,
                "finished_at": T0 + 90_000, "items": 6, "error_kind": null, "http_status": null,
                "error_message": null, "provider_request_id": null,
                "request_id": "abcd-def-dfdf-jjj1", "answered_id": null,
                "data_problem": "`data` is an empty object", "partial": true},
            "credeau": {"outcome": "failed", "polls": 2, "first_poll_at": null,
                "finished_at": T0 + 60_000, "items": null, "error_kind": "identity_mismatch",
                "http_status": 200, "error_message": "answered for another user_id",
                "provider_request_id": "rq-1", "request_id": null, "answered_id": "CR-2",
                "data_problem": null, "partial": false}
        })
    );
}

#[tokio::test]
async fn every_outcome_maps_to_its_avro_enum_symbol() {
    let (_reg, client, avro) = avro_encoder().await;
    for (i, o) in [
        Outcome::Complete,
        Outcome::NoData,
        Outcome::NotFound,
        Outcome::TimedOut,
        Outcome::Failed,
    ]
    .into_iter()
    .enumerate()
    {
        let mut t = task();
        t.finbox.done = finished(o, T0, None);
        t.credeau.done = finished(o, T0, None);
        let v = decode_output(&client, &avro.insights_ready(&t, T0).unwrap()).await;
        assert_eq!(
            field(field(&v, "credeau"), "outcome"),
            &Av::Enum(i as u32, o.as_str().into())
        );
    }
}

#[tokio::test]
async fn insights_ready_before_both_providers_finish_is_an_error() {
    let enc = OutputEncoder::new(OutputEncoding::Json, None, &topics())
        .await
        .unwrap();
    let mut t = task();
    t.finbox.done = finished(Outcome::NoData, T0, None);
    let err = enc.insights_ready(&t, T0).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::NotFinal(insights_enricher::providers::Provider::Credeau)
        ),
        "{err:?}"
    );
}
