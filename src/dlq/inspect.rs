//! `insights-enricher dlq inspect`: counts of dead letters by reason,
//! provider, HTTP status and stage, and the records themselves with their
//! headers, as text for people or JSON for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dlq::read::DlqRecord;
use crate::pipeline::deadletter::headers as h;
use crate::task::Task;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub total: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub by_provider: BTreeMap<String, usize>,
    pub by_http_status: BTreeMap<String, usize>,
    pub by_stage: BTreeMap<String, usize>,
}

pub fn summarize(records: &[DlqRecord]) -> Summary {
    let mut s = Summary {
        total: records.len(),
        ..Default::default()
    };
    for r in records {
        let get = |k: &str| r.header(k).unwrap_or("-").to_string();
        *s.by_reason.entry(get(h::ERROR_CLASS)).or_default() += 1;
        *s.by_provider.entry(get(h::PROVIDER)).or_default() += 1;
        *s.by_http_status.entry(get(h::HTTP_STATUS)).or_default() += 1;
        *s.by_stage.entry(get(h::STAGE)).or_default() += 1;
    }
    s
}

/// A record as shown: headers plus a safe summary of the value (a task's
/// identity and outcomes, or a short escaped prefix of an input event).
#[derive(Debug, Serialize)]
pub struct Shown<'a> {
    #[serde(flatten)]
    pub record: &'a DlqRecord,
    pub value: serde_json::Value,
}

pub fn show(r: &DlqRecord) -> Shown<'_> {
    let value = match (r.header(h::REPLAY_TARGET), r.value.as_deref()) {
        (_, None) => serde_json::Value::Null,
        (Some("task"), Some(v)) => match Task::decode(v) {
            Ok(t) => serde_json::json!({
                "user_id": t.user.user_id,
                "event_id": t.user.event_id,
                "finbox": t.finbox.outcome().map(|o| o.as_str()).unwrap_or("pending"),
                "credeau": t.credeau.outcome().map(|o| o.as_str()).unwrap_or("pending"),
            }),
            Err(e) => serde_json::json!({ "undecodable_task": e.to_string() }),
        },
        (_, Some(v)) => {
            let prefix = &v[..v.len().min(256)];
            serde_json::json!({
                "bytes": v.len(),
                "prefix": String::from_utf8_lossy(prefix).escape_debug().to_string(),
            })
        }
    };
    Shown { record: r, value }
}

pub fn render_text(records: &[DlqRecord], show_records: bool) -> String {
    let s = summarize(records);
    let mut out = format!("dead letters: {}\n", s.total);
    for (title, map) in [
        ("by reason", &s.by_reason),
        ("by provider", &s.by_provider),
        ("by http status", &s.by_http_status),
        ("by stage", &s.by_stage),
    ] {
        out.push_str(&format!("{title}:\n"));
        for (k, v) in map {
            out.push_str(&format!("  {k:<24} {v}\n"));
        }
    }
    if show_records {
        out.push_str("records:\n");
        for r in records {
            let shown = show(r);
            out.push_str(&format!(
                "- partition {} offset {} reason {} stage {} key {}\n",
                r.partition,
                r.offset,
                r.reason(),
                r.header(h::STAGE).unwrap_or("-"),
                r.key.as_deref().unwrap_or("-"),
            ));
            for (k, v) in &r.headers {
                out.push_str(&format!("    {k}: {v}\n"));
            }
            out.push_str(&format!("    value: {}\n", shown.value));
        }
    }
    out
}

pub fn render_json(records: &[DlqRecord]) -> String {
    let shown: Vec<Shown<'_>> = records.iter().map(show).collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "summary": summarize(records),
        "records": shown,
    }))
    .unwrap_or_default()
}
