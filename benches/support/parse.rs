//! The `parse` scenario: how fast the service decodes Credeau answers of
//! the realistic mix, against serde_json's own parse of the same bytes.
//! No broker, no HTTP: the bodies are the simulator's (its generator and
//! its envelope), built in this process, and each decoder runs over all of
//! them, single-threaded, for a while. serde_json checking every byte and
//! keeping nothing is the speed limit of any design that reads each byte
//! once; the backlog scenario's answers per CPU-second set against it show
//! what the rest of the service (HTTP, gzip, encoding the events, Kafka)
//! costs per byte.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use insights_enricher::providers::credeau;
use insights_enricher::simulator::sms::{self, SmsEntry, SmsRequest};
use serde::Serialize;

use super::answers::Answers;
use super::procs::cpu_of;
use super::{round, Ctx, Report};

#[derive(Serialize)]
struct Envelope<'a> {
    extracted_sms_data: &'a [SmsEntry],
}

/// One cycle of the realistic mix: 20 users' Credeau answers, as the
/// simulator serves them.
fn bodies() -> Vec<Vec<u8>> {
    (0..20u64)
        .map(|i| {
            let user = Answers::Realistic.user_id("parse", i);
            let count = Answers::Realistic.sms_count(i);
            let entries = sms::generate(&SmsRequest {
                seed: 7,
                user_id: &user,
                client_id: "bench",
                request_id: "0123456789abcdef",
                ready_at_ms: 1_764_000_000_000,
                count,
            });
            serde_json::to_vec(&Envelope {
                extracted_sms_data: &entries,
            })
            .expect("plain structs serialize")
        })
        .collect()
}

/// Runs `decode` over every body, again and again for at least `span`:
/// megabytes decoded per CPU-second of this process.
fn rate<B: AsRef<[u8]>>(
    bodies: &[B],
    span: Duration,
    mut decode: impl FnMut(&B) -> bool,
) -> Result<f64> {
    let pid = std::process::id();
    let bytes: usize = bodies.iter().map(|b| b.as_ref().len()).sum();
    let began = Instant::now();
    let cpu0 = cpu_of(pid)?;
    let mut passes = 0u64;
    while passes == 0 || began.elapsed() < span {
        for b in bodies {
            if !decode(b) {
                bail!("a body of the mix did not decode");
            }
        }
        passes += 1;
    }
    let cpu = (cpu_of(pid)? - cpu0).as_secs_f64().max(0.01);
    Ok(bytes as f64 * passes as f64 / 1e6 / cpu)
}

pub async fn run(ctx: &Ctx) -> Result<Report> {
    let span = if ctx.smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    let bodies = bodies();
    let mb = bodies.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    let mut r = Report::default();
    r.fig("mix_mb", round(mb, 2));
    let ignored = rate(&bodies, span, |b| {
        serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    })?;
    let tree = rate(&bodies, span, |b| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    })?;
    // The client's bodies arrive as `Bytes`, which its entries slice.
    let shared: Vec<bytes::Bytes> = bodies
        .iter()
        .map(|b| bytes::Bytes::copy_from_slice(b))
        .collect();
    let service = rate(&shared, span, |b| {
        credeau::map_answer(200, Some("application/json"), b).is_ok()
    })?;
    r.fig("serde_json_ignored_mb_per_cpu_s", round(ignored, 1));
    r.fig("serde_json_value_mb_per_cpu_s", round(tree, 1));
    r.fig("service_decode_mb_per_cpu_s", round(service, 1));
    r.fig(
        "service_decode_share_of_serde_json",
        round(service / ignored, 3),
    );
    r.goal(
        "the service's Credeau decode is measured against serde_json's own parse of the same bytes",
        service > 0.0 && ignored > 0.0,
    );
    Ok(r)
}
