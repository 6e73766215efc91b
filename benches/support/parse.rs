//! The `parse` scenario: how fast the service decodes Credeau answers of
//! the realistic mix, against serde_json's own parse of the same bytes.
//! No broker, no HTTP: the bodies are the simulator's (its generator and
//! its envelope), built in this process, and each decoder runs over all of
//! them, single-threaded, for a while. serde_json checking every byte and
//! keeping nothing is the speed limit of any design that reads each byte
//! once; the backlog scenario's answers per CPU-second set against it show
//! what the rest of the service (HTTP, gzip, encoding the events, Kafka)
//! costs per byte.
//!
//! It also times the two steps no design that publishes the same events
//! can skip: encoding each answer's SmsExtraction value (the service's own
//! encoder, JSON) and compressing it with lz4 the way librdkafka does (one
//! LZ4 frame, independent blocks, level 0, the librdkafka linked into this
//! binary). Their sum per user, with serde_json's parse, is a floor on the
//! CPU a user of the mix costs whatever the rest of the design.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use insights_enricher::config::{OutputEncoding, Settings, TopicSettings};
use insights_enricher::events::output::OutputEncoder;
use insights_enricher::providers::{credeau, CredeauAnswer};
use insights_enricher::simulator::sms::{self, SmsEntry, SmsRequest};
use insights_enricher::task::{OnboardedUser, ProviderTrack, SourceRef, Task, TASK_VERSION};
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

/// Runs `decode` over every item, again and again for at least `span`:
/// megabytes (`bytes` a pass) per CPU-second of this process.
fn rate<T>(
    items: &[T],
    bytes: usize,
    span: Duration,
    mut decode: impl FnMut(&T) -> bool,
) -> Result<f64> {
    let pid = std::process::id();
    let began = Instant::now();
    let cpu0 = cpu_of(pid)?;
    let mut passes = 0u64;
    while passes == 0 || began.elapsed() < span {
        for item in items {
            if !decode(item) {
                bail!("an item of the mix failed");
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
    let body_bytes = bodies.iter().map(Vec::len).sum::<usize>();
    let mb = body_bytes as f64 / 1e6;
    let mut r = Report::default();
    r.fig("mix_mb", round(mb, 2));
    let ignored = rate(&bodies, body_bytes, span, |b| {
        serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    })?;
    let tree = rate(&bodies, body_bytes, span, |b| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    })?;
    // The client's bodies arrive as `Bytes`, which its entries slice.
    let shared: Vec<bytes::Bytes> = bodies
        .iter()
        .map(|b| bytes::Bytes::copy_from_slice(b))
        .collect();
    let service = rate(&shared, body_bytes, span, |b| {
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

    // The SmsExtraction values the service publishes for these answers.
    let topics = topics()?;
    let encoder = OutputEncoder::new(OutputEncoding::Json, None, &topics).await?;
    let task = task();
    let max_bytes = topics.max_message_bytes;
    let answers = shared
        .iter()
        .map(
            |b| match credeau::map_answer(200, Some("application/json"), b) {
                Ok(CredeauAnswer::Data(sms)) => Ok(sms),
                _ => bail!("a body of the mix is not an answer with data"),
            },
        )
        .collect::<Result<Vec<_>>>()?;
    let values: Vec<Vec<u8>> = answers
        .iter()
        .map(|sms| encoder.sms_extraction(&task, sms, 0, max_bytes))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let out_bytes = values.iter().map(Vec::len).sum::<usize>();
    let out_mb = out_bytes as f64 / 1e6;
    // Both in MB of encoded values per CPU-second.
    let encode = rate(&answers, out_bytes, span, |sms| {
        encoder.sms_extraction(&task, sms, 0, max_bytes).is_ok()
    })?;
    let mut scratch = Vec::new();
    let lz4 = rate(&values, out_bytes, span, |v| lz4_frame(v, &mut scratch) > 0)?;
    let lz4_ratio = {
        let total: usize = values.iter().map(|v| lz4_frame(v, &mut scratch)).sum();
        out_mb * 1e6 / total.max(1) as f64
    };
    // Milliseconds of one CPU a user of the mix needs at least: its answer
    // parsed once at serde_json's speed, its value encoded and compressed.
    let users = bodies.len() as f64;
    let floor_ms = (mb / ignored + out_mb / encode + out_mb / lz4) * 1e3 / users;
    r.fig("sms_values_mb", round(out_mb, 2));
    r.fig("service_encode_mb_per_cpu_s", round(encode, 1));
    r.fig("lz4_mb_per_cpu_s", round(lz4, 1));
    r.fig("lz4_compression_ratio", round(lz4_ratio, 2));
    r.fig("answer_mb_per_user", round(mb / users, 3));
    r.fig(
        "parse_ms_per_user_at_serde_json",
        round(mb / ignored * 1e3 / users, 3),
    );
    r.fig(
        "encode_ms_per_user",
        round(out_mb / encode * 1e3 / users, 3),
    );
    r.fig("lz4_ms_per_user", round(out_mb / lz4 * 1e3 / users, 3));
    r.fig("floor_ms_per_user", round(floor_ms, 3));
    r.goal(
        "the encoding and lz4 of the same answers are measured",
        encode > 0.0 && lz4 > 0.0 && lz4_ratio > 1.0,
    );
    Ok(r)
}

/// LZ4 frame preferences (lz4frame.h, the copy inside librdkafka).
#[repr(C)]
#[derive(Default)]
struct Lz4FrameInfo {
    block_size_id: u32,
    block_mode: u32,
    content_checksum: u32,
    frame_type: u32,
    content_size: u64,
    dict_id: u32,
    block_checksum: u32,
}

#[repr(C)]
#[derive(Default)]
struct Lz4Preferences {
    frame_info: Lz4FrameInfo,
    compression_level: i32,
    auto_flush: u32,
    favor_dec_speed: u32,
    reserved: [u32; 3],
}

extern "C" {
    fn LZ4F_compressFrameBound(src_size: usize, prefs: *const Lz4Preferences) -> usize;
    fn LZ4F_compressFrame(
        dst: *mut u8,
        dst_capacity: usize,
        src: *const u8,
        src_size: usize,
        prefs: *const Lz4Preferences,
    ) -> usize;
    fn LZ4F_isError(code: usize) -> u32;
}

/// `src` as one LZ4 frame with librdkafka's preferences (independent
/// blocks, level 0): the frame's size, 0 on an error.
fn lz4_frame(src: &[u8], dst: &mut Vec<u8>) -> usize {
    let prefs = Lz4Preferences {
        frame_info: Lz4FrameInfo {
            block_mode: 1, // LZ4F_blockIndependent, as Kafka requires
            ..Lz4FrameInfo::default()
        },
        ..Lz4Preferences::default()
    };
    // SAFETY: the functions are lz4's own, linked in with librdkafka;
    // `dst` is sized by LZ4F_compressFrameBound for these preferences,
    // and both buffers outlive the calls.
    unsafe {
        let bound = LZ4F_compressFrameBound(src.len(), &prefs);
        dst.clear();
        dst.reserve(bound);
        let n = LZ4F_compressFrame(dst.as_mut_ptr(), bound, src.as_ptr(), src.len(), &prefs);
        if LZ4F_isError(n) != 0 {
            return 0;
        }
        dst.set_len(n);
        n
    }
}

/// The service's default topic settings (the credentials are only there
/// because a configuration without them does not load).
fn topics() -> Result<TopicSettings> {
    let env = [
        ("INSIGHTS__FINBOX__API_KEY", "bench"),
        ("INSIGHTS__FINBOX__SERVER_HASH", "bench"),
        ("INSIGHTS__CREDEAU__CLIENT_ID", "bench"),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN", "bench"),
    ];
    let settings = Settings::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )?;
    Ok(settings.topics)
}

fn task() -> Task {
    let user = "parse-user".to_string();
    Task {
        v: TASK_VERSION,
        user: OnboardedUser {
            event_id: "ev-parse".into(),
            user_id: user.clone(),
            finbox_customer_id: user.clone(),
            credeau_user_id: user,
            onboarded_at: 1_764_000_000_000,
        },
        origin: SourceRef {
            topic: "users.onboarded".into(),
            partition: 0,
            offset: 0,
        },
        created_at: 1_764_000_000_000,
        due_at: 1_764_000_000_000,
        finbox: ProviderTrack::pending(1_764_000_000_000, 10_000),
        credeau: ProviderTrack::pending(1_764_000_000_000, 15_000),
        replay_of: None,
    }
}
