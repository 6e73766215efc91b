//! Schema evolution policy: every current schema must read data written
//! with every released version (backward compatibility), every field must
//! be documented, and the check itself must catch incompatible edits.

use std::path::PathBuf;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use insights_enricher::events::avro::EventSchema;
use serde_json::{json, Value};

fn released(schema: EventSchema) -> Vec<(PathBuf, Schema)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/released")
        .join(schema.file_stem());
    let mut out: Vec<(PathBuf, Schema)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let s = Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, s)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn current(schema: EventSchema) -> Schema {
    Schema::parse_str(schema.text()).unwrap()
}

#[test]
fn every_schema_has_a_released_v1() {
    for s in EventSchema::ALL {
        let versions = released(s);
        assert!(
            versions.iter().any(|(p, _)| p.ends_with("v1.avsc")),
            "{} has no released v1",
            s.file_stem()
        );
    }
}

#[test]
fn current_schemas_read_data_written_with_every_released_version() {
    for s in EventSchema::ALL {
        let reader = current(s);
        for (path, writer) in released(s) {
            if let Err(e) = SchemaCompatibility::can_read(&writer, &reader) {
                panic!(
                    "{} cannot read data written with {}: {e}",
                    s.file_stem(),
                    path.display()
                );
            }
        }
    }
}

/// Every record, its fields and every enum carry a "doc": the schemas are
/// the consumer-facing documentation.
fn undocumented(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            let is_named = matches!(
                o.get("type").and_then(Value::as_str),
                Some("record" | "enum")
            );
            let is_field = o.contains_key("name") && o.contains_key("type") && !is_named;
            let name = o.get("name").and_then(Value::as_str).unwrap_or("?");
            if (is_named || is_field) && !o.get("doc").is_some_and(Value::is_string) {
                out.push(format!("{path}/{name}"));
            }
            for (k, child) in o {
                undocumented(child, &format!("{path}/{name}.{k}"), out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| undocumented(c, path, out)),
        _ => {}
    }
}

#[test]
fn every_record_field_and_enum_is_documented() {
    for s in EventSchema::ALL {
        let mut missing = Vec::new();
        undocumented(
            &serde_json::from_str(s.text()).unwrap(),
            s.file_stem(),
            &mut missing,
        );
        assert!(missing.is_empty(), "undocumented: {missing:?}");
    }
}

fn edited(schema: EventSchema, edit: impl FnOnce(&mut Value)) -> Schema {
    let mut v: Value = serde_json::from_str(schema.text()).unwrap();
    edit(&mut v);
    Schema::parse_str(&v.to_string()).unwrap()
}

fn v1(schema: EventSchema) -> Schema {
    released(schema)
        .into_iter()
        .find(|(p, _)| p.ends_with("v1.avsc"))
        .unwrap()
        .1
}

#[test]
fn a_new_field_without_a_default_is_detected() {
    let broken = edited(EventSchema::InsightsReady, |v| {
        v["fields"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "score", "type": "double", "doc": "x"}));
    });
    assert!(SchemaCompatibility::can_read(&v1(EventSchema::InsightsReady), &broken).is_err());

    // The same field with a default is a compatible change.
    let fine = edited(EventSchema::InsightsReady, |v| {
        v["fields"].as_array_mut().unwrap().push(
            json!({"name": "score", "type": ["null", "double"], "default": null, "doc": "x"}),
        );
    });
    assert!(SchemaCompatibility::can_read(&v1(EventSchema::InsightsReady), &fine).is_ok());
}

#[test]
fn a_removed_enum_symbol_is_detected() {
    let broken = edited(EventSchema::InsightsReady, |v| {
        let outcome = &mut v["fields"][5]["type"]["fields"][0]["type"];
        assert_eq!(outcome["name"], "ProviderOutcome");
        outcome["symbols"].as_array_mut().unwrap().pop();
    });
    assert!(SchemaCompatibility::can_read(&v1(EventSchema::InsightsReady), &broken).is_err());
}

#[test]
fn a_changed_field_type_is_detected() {
    let broken = edited(EventSchema::SmsExtraction, |v| {
        let part = &mut v["fields"][5];
        assert_eq!(part["name"], "part");
        part["type"] = json!("string");
    });
    assert!(SchemaCompatibility::can_read(&v1(EventSchema::SmsExtraction), &broken).is_err());
}
