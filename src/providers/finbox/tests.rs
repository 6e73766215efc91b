use super::*;
use serde_json::json;

fn map(status: u16, body: Value) -> Result<FinboxAnswer, ProviderError> {
    map_response(
        status,
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}

fn kind(status: u16, body: Value) -> Kind {
    map(status, body).unwrap_err().kind
}

#[test]
fn in_progress_202_carries_the_suggested_wait() {
    let a = map(
        202,
        json!({"customer_id": "c", "request_id": "r", "date_requested": "2019-01-03T06:37:44:003",
               "status": "in_progress", "message": "Featurization in Progress, please try again in 10 Seconds"}),
    )
    .unwrap();
    assert_eq!(
        a,
        FinboxAnswer::InProgress {
            suggested_wait: Some(Duration::from_secs(10)),
            request_id: Some("r".into()),
        }
    );
}

#[test]
fn complete_keeps_open_predictors_and_raw_timestamps() {
    let a = map(
        200,
        json!({"request_id": "abcd", "date_requested": "2019-01-03T06:37:44:003",
               "date_processed": "2018-12-12T01:01:57:221", "status": "complete",
               "message": "data processed successfully", "brand_new_key": {"x": 1},
               "data": [{"name": "n1", "value": 1.5}, {"name": "s", "value": "x", "extra": true},
                        {"name": "b", "value": false}, {"name": "nul", "value": null}, {"name": "absent"}]}),
    )
    .unwrap();
    let FinboxAnswer::Complete(ins) = a else {
        panic!("not complete: {a:?}")
    };
    assert_eq!(ins.request_id.as_deref(), Some("abcd"));
    assert_eq!(
        ins.date_processed.as_deref(),
        Some("2018-12-12T01:01:57:221")
    );
    let values: Vec<_> = ins
        .predictors
        .iter()
        .map(|p| (p.name.as_str(), p.value.clone()))
        .collect();
    assert_eq!(
        values,
        vec![
            ("n1", json!(1.5)),
            ("s", json!("x")),
            ("b", json!(false)),
            ("nul", Value::Null),
            ("absent", Value::Null)
        ]
    );
    assert_eq!(ins.message.as_deref(), Some("data processed successfully"));
    assert_eq!(
        Value::Object(ins.predictors[1].extra.clone()),
        json!({"extra": true})
    );
    assert_eq!(ins.data_problem, None);
}

#[test]
fn raw_data_is_kept_byte_for_byte() {
    let body = br#"{"status": "complete", "data": [ {"name": "big", "value": 123456789012345678901234567890},
        {"name":"f","value":1.10} ]}"#;
    let FinboxAnswer::Complete(ins) = map_response(200, Some("application/json"), body).unwrap()
    else {
        panic!("not complete")
    };
    assert_eq!(
        ins.data_json.as_deref(),
        Some(
            r#"[ {"name": "big", "value": 123456789012345678901234567890},
        {"name":"f","value":1.10} ]"#
        )
    );
    let none = map(200, json!({"status": "complete", "data": null})).unwrap();
    let FinboxAnswer::Complete(ins) = none else {
        panic!()
    };
    assert_eq!((ins.data_json, ins.predictors.len()), (None, 0));
}

#[test]
fn complete_answers_in_another_shape_are_read_as_far_as_they_go_not_retried() {
    let complete =
        |data: Value| match map(200, json!({"status": "complete", "data": data})).unwrap() {
            FinboxAnswer::Complete(ins) => ins,
            other => panic!("{other:?}"),
        };
    let obj = complete(json!({"b": 2, "a": "x"}));
    let names: Vec<_> = obj.predictors.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(obj.data_problem.unwrap().contains("object"));
    assert_eq!(obj.data_json.as_deref(), Some(r#"{"a":"x","b":2}"#));

    let mixed = complete(json!([{"name": "ok", "value": 1}, {"value": 1}, 7, {"name": 3}]));
    assert_eq!(mixed.predictors.len(), 1);
    assert_eq!(
        mixed.data_problem.as_deref(),
        Some("3 of 4 `data` entries are not objects with a string `name` (the first is data[1]); they are only in data_json")
    );
    let text = complete(json!("opaque"));
    assert!(text.predictors.is_empty());
    assert_eq!(
        text.data_problem.as_deref(),
        Some("`data` is a string, not a list")
    );
}

#[test]
fn no_data_and_not_found_tolerate_missing_keys() {
    assert_eq!(
        map(
            200,
            json!({"status": "no_data", "data": null, "request_id": "r1"})
        )
        .unwrap(),
        FinboxAnswer::NoData {
            request_id: Some("r1".into())
        }
    );
    assert_eq!(
        map(200, json!({"status": "not_found", "date_processed": null})).unwrap(),
        FinboxAnswer::NotFound { request_id: None }
    );
    assert_eq!(
        map(200, json!({"status": "not_found", "request_id": "nf-1"}))
            .unwrap()
            .request_id(),
        Some("nf-1")
    );
}

#[test]
fn error_statuses_map_to_their_kinds_with_the_providers_message() {
    let e = map(
        400,
        json!({"status": "error", "message": "Missing Key version", "request_id": "q"}),
    )
    .unwrap_err();
    assert_eq!((e.kind, e.http_status), (Kind::BadRequest, Some(400)));
    assert_eq!(e.message, "Missing Key version");
    assert_eq!(e.provider_request_id.as_deref(), Some("q"));
    assert_eq!(
        kind(
            403,
            json!({"status": "error", "message": "Incorrect API Key"})
        ),
        Kind::Forbidden
    );
    assert_eq!(
        kind(
            429,
            json!({"status": "error", "message": "Rate limit exceeded"})
        ),
        Kind::RateLimited
    );
    assert_eq!(kind(500, json!({"status": "error"})), Kind::ServerError);
    assert_eq!(kind(503, json!({})), Kind::ServerError);
    assert_eq!(kind(404, json!({})), Kind::UnexpectedStatus);
    assert_eq!(kind(408, json!({})), Kind::Timeout);
}

#[test]
fn unknown_status_non_json_and_truncated_bodies_are_invalid() {
    assert_eq!(kind(200, json!({"status": "queued"})), Kind::InvalidBody);
    assert_eq!(
        kind(200, json!({"message": "no status"})),
        Kind::InvalidBody
    );
    let html = map_response(200, Some("text/html"), b"<html><title>Hi</title></html>").unwrap_err();
    assert_eq!(html.kind, Kind::InvalidBody);
    assert!(html.message.contains("text/html"), "{}", html.message);
    let cut = map_response(200, Some("application/json"), br#"{"status": "comp"#).unwrap_err();
    assert_eq!(cut.kind, Kind::InvalidBody);
    assert!(cut.message.starts_with("truncated JSON"), "{}", cut.message);
}

#[test]
fn proxy_html_502_is_a_retryable_server_error() {
    let e = map_response(
        502,
        Some("text/html"),
        b"<html><head><title>502 Bad Gateway</title></head></html>",
    )
    .unwrap_err();
    assert_eq!(e.kind, Kind::ServerError);
    assert!(e.is_retryable());
    assert!(e.message.contains("502 Bad Gateway"), "{}", e.message);
}

#[test]
fn suggested_wait_reads_number_and_unit() {
    let p = parse_suggested_wait;
    assert_eq!(
        p("please try again in 10 Seconds"),
        Some(Duration::from_secs(10))
    );
    assert_eq!(p("retry in 2 minutes."), Some(Duration::from_secs(120)));
    assert_eq!(p("retry in 30s"), Some(Duration::from_secs(30)));
    assert_eq!(p("Featurization in Progress"), None);
    assert_eq!(p("version 2 of 3"), None);
}
