//! docs/events.md and the schemas must agree: every JSON example of an
//! output event in the doc is read through its Avro schema (each field,
//! union branch and logical type checked, then encoded with apache-avro),
//! must name exactly the schema's fields, and `InsightsReady` examples must
//! follow the documented rule for the error fields.

use apache_avro::schema::{RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value as Av;
use insights_enricher::events::avro::EventSchema;
use serde_json::Value;

fn doc() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/events.md");
    std::fs::read_to_string(path).unwrap()
}

/// The ```json blocks of a Markdown text.
fn json_blocks(md: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("unterminated code block");
        let text = &body[..end];
        out.push(
            serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("example is not JSON ({e}):\n{text}")),
        );
        rest = &body[end + 3..];
    }
    out
}

/// Reads `v` as a datum of `schema`, the way a consumer's JSON-to-Avro
/// mapping would: every record field must be present (no extra keys),
/// nulls only where the schema allows them.
fn to_avro(v: &Value, schema: &Schema, names: &RecordNames, path: &str) -> Result<Av, String> {
    match (schema, v) {
        (Schema::Ref { name }, _) => {
            let target = names
                .get(name)
                .ok_or_else(|| format!("{path}: unknown {name:?}"))?;
            to_avro(v, target, names, path)
        }
        (Schema::Null, Value::Null) => Ok(Av::Null),
        (Schema::Boolean, Value::Bool(b)) => Ok(Av::Boolean(*b)),
        (Schema::Int, Value::Number(n)) => n
            .as_i64()
            .and_then(|i| i32::try_from(i).ok())
            .map(Av::Int)
            .ok_or_else(|| format!("{path}: {n} is not an int")),
        (Schema::Long, Value::Number(n)) => n
            .as_i64()
            .map(Av::Long)
            .ok_or_else(|| format!("{path}: {n} is not a long")),
        (Schema::TimestampMillis, Value::Number(n)) => n
            .as_i64()
            .map(Av::TimestampMillis)
            .ok_or_else(|| format!("{path}: {n} is not epoch millis")),
        (Schema::Double, Value::Number(n)) => Ok(Av::Double(n.as_f64().unwrap_or(f64::NAN))),
        (Schema::String, Value::String(s)) => Ok(Av::String(s.clone())),
        (Schema::Enum(e), Value::String(s)) => e
            .symbols
            .iter()
            .position(|x| x == s)
            .map(|i| Av::Enum(i as u32, s.clone()))
            .ok_or_else(|| format!("{path}: {s:?} is not one of {:?}", e.symbols)),
        (Schema::Array(a), Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, x)| to_avro(x, &a.items, names, &format!("{path}[{i}]")))
            .collect::<Result<_, _>>()
            .map(Av::Array),
        (Schema::Map(m), Value::Object(o)) => o
            .iter()
            .map(|(k, x)| {
                Ok((
                    k.clone(),
                    to_avro(x, &m.types, names, &format!("{path}.{k}"))?,
                ))
            })
            .collect::<Result<_, String>>()
            .map(Av::Map),
        (Schema::Union(u), _) => union(v, u, names, path),
        (Schema::Record(r), Value::Object(o)) => record(o, r, names, path),
        (s, v) => Err(format!("{path}: {v} does not fit {s:?}")),
    }
}

fn union(v: &Value, u: &UnionSchema, names: &RecordNames, path: &str) -> Result<Av, String> {
    let mut why = Vec::new();
    for (i, branch) in u.variants().iter().enumerate() {
        match to_avro(v, branch, names, path) {
            Ok(x) => return Ok(Av::Union(i as u32, Box::new(x))),
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

fn record(
    o: &serde_json::Map<String, Value>,
    r: &RecordSchema,
    names: &RecordNames,
    path: &str,
) -> Result<Av, String> {
    let mut fields = Vec::new();
    for f in &r.fields {
        let v = o
            .get(&f.name)
            .ok_or_else(|| format!("{path}: the example lacks field {:?}", f.name))?;
        fields.push((
            f.name.clone(),
            to_avro(v, &f.schema, names, &format!("{path}.{}", f.name))?,
        ));
    }
    let known: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
    if let Some(extra) = o.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("{path}: {extra:?} is not a field of {}", r.name));
    }
    Ok(Av::Record(fields))
}

type RecordNames = std::collections::HashMap<apache_avro::schema::Name, Schema>;

/// Every named type of a schema, for resolving `Schema::Ref`.
fn named(schema: &Schema, out: &mut RecordNames) {
    match schema {
        Schema::Record(r) => {
            out.insert(r.name.clone(), schema.clone());
            r.fields.iter().for_each(|f| named(&f.schema, out));
        }
        Schema::Enum(e) => {
            out.insert(e.name.clone(), schema.clone());
        }
        Schema::Array(a) => named(&a.items, out),
        Schema::Map(m) => named(&m.types, out),
        Schema::Union(u) => u.variants().iter().for_each(|s| named(s, out)),
        _ => {}
    }
}

/// Reads an example through `which`'s schema and encodes it, as a consumer
/// with the schema would.
fn through_schema(example: &Value, which: EventSchema) -> Result<(), String> {
    let schema = which.schema().unwrap();
    let mut names = RecordNames::new();
    named(schema, &mut names);
    let datum = to_avro(example, schema, &names, which.file_stem())?;
    apache_avro::to_avro_datum(schema, datum)
        .map(drop)
        .map_err(|e| format!("{}: {e}", which.file_stem()))
}

fn kind_of(example: &Value) -> Option<EventSchema> {
    let o = example.as_object()?;
    if o.contains_key("completed_at") {
        Some(EventSchema::InsightsReady)
    } else if o.contains_key("predictors") {
        Some(EventSchema::FinboxPredictors)
    } else if o.contains_key("total_sms") {
        Some(EventSchema::SmsExtraction)
    } else {
        None
    }
}

const ERROR_FIELDS: [&str; 4] = [
    "error_kind",
    "http_status",
    "error_message",
    "provider_request_id",
];

/// The rule docs/events.md states: error fields only on `failed`, and a
/// `failed` result names its error.
fn error_rule(result: &Value) -> Result<(), String> {
    let failed = result["outcome"] == "failed";
    for k in ERROR_FIELDS {
        if !failed && !result[k].is_null() {
            return Err(format!("{k} is set on a {} result", result["outcome"]));
        }
    }
    if failed && (result["error_kind"].is_null() || result["error_message"].is_null()) {
        return Err("a failed result without error_kind and error_message".into());
    }
    Ok(())
}

#[test]
fn every_output_example_in_the_doc_reads_through_its_schema() {
    let examples = json_blocks(&doc());
    let mut seen = std::collections::BTreeMap::new();
    for ex in &examples {
        let Some(which) = kind_of(ex) else { continue };
        *seen.entry(which.file_stem()).or_insert(0) += 1;
        if let Err(e) = through_schema(ex, which) {
            panic!("docs/events.md example does not fit its schema: {e}\n{ex:#}");
        }
    }
    assert!(
        seen.get("insights_ready").copied().unwrap_or(0) >= 3,
        "{seen:?}"
    );
    assert!(seen.contains_key("finbox_predictors"), "{seen:?}");
}

#[test]
fn insights_ready_examples_set_error_fields_only_on_failed_results() {
    let examples: Vec<Value> = json_blocks(&doc())
        .into_iter()
        .filter(|e| kind_of(e) == Some(EventSchema::InsightsReady))
        .collect();
    let mut outcomes = std::collections::BTreeSet::new();
    for ex in &examples {
        for p in ["finbox", "credeau"] {
            outcomes.insert(ex[p]["outcome"].as_str().unwrap().to_owned());
            if let Err(e) = error_rule(&ex[p]) {
                panic!("docs/events.md breaks its own error-field rule: {p}: {e}\n{ex:#}");
            }
        }
    }
    // The examples cover failed and not failed results.
    assert!(outcomes.contains("failed"), "{outcomes:?}");
    assert!(outcomes.len() >= 4, "{outcomes:?}");
    // The schema's docs say the same as the doc.
    let schema: Value = serde_json::from_str(EventSchema::InsightsReady.text()).unwrap();
    let fields = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "finbox")
        .unwrap()["type"]["fields"]
        .as_array()
        .unwrap()
        .clone();
    for k in ERROR_FIELDS {
        let f = fields.iter().find(|f| f["name"] == k).unwrap();
        let d = f["doc"].as_str().unwrap();
        assert!(
            d.starts_with("Set only when outcome is failed"),
            "{k}: schema doc disagrees with docs/events.md: {d}"
        );
    }
}

#[test]
fn the_checks_catch_an_example_that_breaks_them() {
    let examples = json_blocks(&doc());
    let good = examples
        .iter()
        .find(|e| kind_of(e) == Some(EventSchema::InsightsReady))
        .unwrap()
        .clone();
    let mut missing = good.clone();
    missing["finbox"]
        .as_object_mut()
        .unwrap()
        .remove("request_id");
    assert!(through_schema(&missing, EventSchema::InsightsReady).is_err());
    let mut bad_enum = good.clone();
    bad_enum["finbox"]["outcome"] = "done".into();
    assert!(through_schema(&bad_enum, EventSchema::InsightsReady).is_err());
    let mut unknown = good.clone();
    unknown["surprise"] = 1.into();
    assert!(through_schema(&unknown, EventSchema::InsightsReady).is_err());
    let mut stray_error = good.clone();
    stray_error["finbox"]["outcome"] = "timed_out".into();
    stray_error["finbox"]["error_kind"] = "timeout".into();
    assert!(error_rule(&stray_error["finbox"]).is_err());
}
