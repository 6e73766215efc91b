//! In-memory stand-ins for the broker (with its consumer group and
//! transactions) and for both providers, so the consume loop can be tried
//! without a broker, in tokio's paused time.
//!
//! The broker keeps what exactly-once depends on:
//! - read_committed visibility: a transaction's records appear when it
//!   commits, never when it aborts;
//! - group offsets move only with a committed transaction;
//! - a member that does not poll within `max.poll.interval` leaves the
//!   group: its partitions are lost, and it joins again (new generation,
//!   new member id, new epochs) reading from the committed offsets;
//! - offsets sent with a stale generation or member id are refused, but
//!   offsets sent with no membership at all (generation -1) are accepted
//!   unfenced, as a real broker does;
//! - every committed transaction's offsets are checked to start exactly at
//!   the group's committed offset: anything else is a record processed
//!   twice (or skipped), and is recorded as a violation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::pipeline::ports::{
    CommitError, GroupToken, LoopConsumer, Membership, Polled, TransactionGate, TxnProducer,
};
use crate::pipeline::record::{
    BatchOffsets, Epoch, Incoming, OutRecord, SourceKind, TopicPartition,
};
use crate::providers::{
    CredeauAnswer, CredeauApi, FinboxAnswer, FinboxApi, FinboxInsights, Predictor, Provider,
    ProviderError, ProviderErrorKind, SmsExtraction,
};

#[derive(Debug, Clone)]
pub struct Stored {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

struct State {
    partitions: BTreeMap<String, i32>,
    kinds: HashMap<String, SourceKind>,
    logs: HashMap<TopicPartition, Vec<Stored>>,
    committed: HashMap<TopicPartition, i64>,
    // The group, as the broker sees it.
    generation: i32,
    member: Option<String>,
    members_made: u32,
    max_poll_interval: Duration,
    last_poll: Instant,
    rejoin_at: Option<Instant>,
    left: u32,
    violations: Vec<String>,
    // The consumer's view.
    membership: Membership,
    assigned: HashMap<TopicPartition, Epoch>,
    epochs: Epoch,
    changes: u64,
    positions: HashMap<TopicPartition, i64>,
    paused: HashSet<TopicPartition>,
    revoked: Vec<TopicPartition>,
    next_partition: usize,
    // The producer's open transaction.
    staged: Option<Vec<(TopicPartition, Stored)>>,
    staged_offsets: Vec<(TopicPartition, i64, i64)>,
    commits: u32,
    aborts: u32,
    fail_commits: Vec<u32>,
    /// How long every commit takes (a broker's round trips).
    commit_latency: Duration,
    fatal_commits: Vec<u32>,
    /// Commits whose call is given up on (`CommitError::Abandoned`), and
    /// whether the broker had applied them.
    abandoned_commits: Vec<(u32, bool)>,
    renewals: u32,
    disruptions: Vec<(u32, Disruption)>,
    lost_pending: bool,
    max_poll_gap: Duration,
    rebalance_in_poll: bool,
    /// Polls from this one on fail fatally (a fenced static member).
    fenced_from_poll: Option<u32>,
    polls: u32,
}

/// The broker, its one consumer group member and the transactional
/// producer, in one object (it implements both ports).
pub struct FakeBroker {
    state: Mutex<State>,
    gate: TransactionGate,
}

impl FakeBroker {
    /// Topics with their partition counts and kinds (what the loop reads);
    /// other topics written to get one partition.
    pub fn new(topics: &[(&str, i32, Option<SourceKind>)], max_poll_interval: Duration) -> Self {
        let mut partitions = BTreeMap::new();
        let mut kinds = HashMap::new();
        for (t, n, kind) in topics {
            partitions.insert(t.to_string(), *n);
            if let Some(k) = kind {
                kinds.insert(t.to_string(), *k);
            }
        }
        let broker = FakeBroker {
            state: Mutex::new(State {
                partitions,
                kinds,
                logs: HashMap::new(),
                committed: HashMap::new(),
                generation: 0,
                member: None,
                members_made: 0,
                max_poll_interval,
                last_poll: Instant::now(),
                rejoin_at: None,
                left: 0,
                violations: vec![],
                membership: Membership {
                    generation: -1,
                    member_id: String::new(),
                },
                assigned: HashMap::new(),
                epochs: 0,
                changes: 0,
                positions: HashMap::new(),
                paused: HashSet::new(),
                revoked: vec![],
                next_partition: 0,
                staged: None,
                staged_offsets: vec![],
                commits: 0,
                aborts: 0,
                fail_commits: vec![],
                commit_latency: Duration::ZERO,
                fatal_commits: vec![],
                abandoned_commits: vec![],
                renewals: 0,
                disruptions: vec![],
                lost_pending: false,
                max_poll_gap: Duration::ZERO,
                rebalance_in_poll: false,
                fenced_from_poll: None,
                polls: 0,
            }),
            gate: TransactionGate::new(Duration::from_secs(1)),
        };
        broker.lock().join();
        broker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record outside any transaction (a test's own producer).
    pub fn produce(&self, topic: &str, partition: i32, key: &str, value: Vec<u8>) {
        let mut s = self.lock();
        s.logs
            .entry(TopicPartition::new(topic, partition))
            .or_default()
            .push(Stored {
                key: Some(key.as_bytes().to_vec()),
                value: Some(value),
                headers: vec![],
            });
    }

    /// Every record visible to a read_committed reader of `topic`.
    pub fn read_topic(&self, topic: &str) -> Vec<Stored> {
        let s = self.lock();
        let mut out = vec![];
        let mut tps: Vec<_> = s.logs.keys().filter(|tp| tp.topic == topic).collect();
        tps.sort();
        for tp in tps {
            out.extend(s.logs[tp].iter().cloned());
        }
        out
    }

    pub fn committed(&self, tp: &TopicPartition) -> i64 {
        self.lock().committed.get(tp).copied().unwrap_or(0)
    }

    pub fn log_end(&self, tp: &TopicPartition) -> i64 {
        self.lock().logs.get(tp).map_or(0, |l| l.len() as i64)
    }

    /// How often the member left the group (max.poll.interval exceeded or
    /// removed by the test).
    pub fn times_left(&self) -> u32 {
        self.lock().left
    }

    /// Committed transactions whose offsets did not start at the group's
    /// committed offset: records processed twice or skipped.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The longest the member went without polling.
    pub fn max_poll_gap(&self) -> Duration {
        self.lock().max_poll_gap
    }

    pub fn commits_and_aborts(&self) -> (u32, u32) {
        let s = self.lock();
        (s.commits, s.aborts)
    }

    /// Makes every commit from now on take `latency`.
    pub fn slow_commits(&self, latency: Duration) {
        self.lock().commit_latency = latency;
    }

    /// Makes the `n`th commit from now (1 = the next) fail as abortable.
    pub fn fail_commit(&self, n: u32) {
        let mut s = self.lock();
        let at = s.commits + s.aborts + n;
        s.fail_commits.push(at);
    }

    /// Makes the `n`th commit from now fail fatally, as librdkafka's does
    /// when the coordinator aborted the transaction during an outage.
    pub fn fail_commit_fatally(&self, n: u32) {
        let mut s = self.lock();
        let at = s.commits + s.aborts + n;
        s.fatal_commits.push(at);
    }

    /// Makes the `n`th commit from now hang until it is given up on
    /// (`Abandoned`), after the broker applied it (`applied`) or before.
    pub fn abandon_commit(&self, n: u32, applied: bool) {
        let mut s = self.lock();
        let at = s.commits + s.aborts + n;
        s.abandoned_commits.push((at, applied));
    }

    /// How many times the producer was replaced.
    pub fn renewals(&self) -> u32 {
        self.lock().renewals
    }

    /// Makes the next poll revoke every partition, assign them again (new
    /// epochs, positions at the committed offsets) and return a record of
    /// the new assignment, as one librdkafka poll can.
    pub fn rebalance_in_next_poll(&self) {
        self.lock().rebalance_in_poll = true;
    }

    /// From the `n`th poll from now on (1 = the next), the consumer fails
    /// fatally, as librdkafka's does when a static member is fenced.
    pub fn fence_consumer(&self, n: u32) {
        let mut s = self.lock();
        s.fenced_from_poll = Some(s.polls + n);
    }

    /// A new process takes the member's place (its predecessor closed):
    /// nothing paused, positions at the committed offsets.
    pub fn restart_member(&self) {
        let mut s = self.lock();
        s.leave();
        s.deliver_lost();
        s.revoked.clear();
        s.join();
    }

    /// At the start of the `n`th transaction from now, takes the member out
    /// of the group as a missed poll or an expired session would.
    pub fn disrupt_at_commit(&self, n: u32, how: Disruption) {
        let mut s = self.lock();
        let at = s.commits + s.aborts + n;
        s.disruptions.push((at, how));
    }
}

/// How a member loses its partitions in the middle of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruption {
    /// It leaves (the application has not polled since); another member
    /// takes every partition and processes all that is there; this one
    /// joins again at its first poll after `out_for`.
    OtherMemberTakesOver { out_for: Duration },
    /// It leaves, and the application polls and joins again before the
    /// transaction sends its offsets (new generation and epochs), reading
    /// again from the committed offsets.
    Rejoin,
    /// As `Rejoin`, and the transaction then takes `stalls_for` (a broker
    /// outage): meanwhile the loop reads the same partitions again under
    /// their new epochs, into the batches after the doomed one.
    RejoinThenStall { stalls_for: Duration },
}

impl State {
    /// The member leaves: at once on the broker and in the metadata the
    /// client would send, but the application learns of its lost
    /// partitions only at its next poll (the rebalance callback).
    fn leave(&mut self) {
        self.left += 1;
        self.member = None;
        self.generation += 1;
        self.membership = Membership {
            generation: -1,
            member_id: String::new(),
        };
        self.lost_pending = true;
    }

    /// What the next poll does after a leave: the lost partitions are
    /// revoked in the application's view.
    fn deliver_lost(&mut self) {
        if !std::mem::take(&mut self.lost_pending) {
            return;
        }
        let lost: Vec<TopicPartition> = self.assigned.drain().map(|(tp, _)| tp).collect();
        self.revoked.extend(lost);
        self.positions.clear();
        self.paused.clear();
        self.changes += 1;
    }

    fn join(&mut self) {
        self.members_made += 1;
        let id = format!("member-{}", self.members_made);
        self.generation += 1;
        self.member = Some(id.clone());
        self.membership = Membership {
            generation: self.generation,
            member_id: id,
        };
        let all: Vec<TopicPartition> = self
            .kinds
            .keys()
            .flat_map(|t| (0..self.partitions[t]).map(move |p| TopicPartition::new(t.as_str(), p)))
            .collect();
        for tp in all {
            self.epochs += 1;
            let at = self.committed.get(&tp).copied().unwrap_or(0);
            self.positions.insert(tp.clone(), at);
            self.assigned.insert(tp, self.epochs);
        }
        self.changes += 1;
        self.last_poll = Instant::now();
    }

    /// What librdkafka's own threads do between polls: leave the group when
    /// the application has not polled within max.poll.interval.
    fn tick(&mut self, now: Instant) {
        if self.member.is_some() && now.duration_since(self.last_poll) > self.max_poll_interval {
            self.leave();
        }
    }

    fn next_record(&mut self) -> Option<Incoming> {
        let mut tps: Vec<TopicPartition> = self
            .assigned
            .keys()
            .filter(|tp| !self.paused.contains(*tp))
            .cloned()
            .collect();
        tps.sort();
        if tps.is_empty() {
            return None;
        }
        for i in 0..tps.len() {
            let tp = &tps[(self.next_partition + i) % tps.len()];
            let pos = self.positions.get(tp).copied().unwrap_or(0);
            let Some(rec) = self.logs.get(tp).and_then(|l| l.get(pos as usize)).cloned() else {
                continue;
            };
            self.next_partition = (self.next_partition + i + 1) % tps.len();
            self.positions.insert(tp.clone(), pos + 1);
            return Some(Incoming {
                kind: self.kinds[&tp.topic],
                topic: tp.topic.clone(),
                partition: tp.partition,
                offset: pos,
                timestamp: Some(crate::pipeline::worker::now_ms()),
                key: rec.key,
                value: rec.value,
                headers: vec![],
            });
        }
        None
    }

    fn partition_for(&self, topic: &str, key: Option<&[u8]>) -> i32 {
        let n = self.partitions.get(topic).copied().unwrap_or(1).max(1);
        let h = key.map_or(0u32, |k| {
            k.iter()
                .fold(2166136261u32, |h, b| (h ^ *b as u32).wrapping_mul(16777619))
        });
        (h % n as u32) as i32
    }
}

#[async_trait]
impl LoopConsumer for FakeBroker {
    async fn poll(&self, wait: Duration) -> Polled {
        let fenced;
        {
            let mut s = self.lock();
            s.polls += 1;
            fenced = s.fenced_from_poll.is_some_and(|n| s.polls >= n);
        }
        if fenced {
            // librdkafka repeats the error at every poll; a short pause
            // lets paused time advance if the loop ignores it.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Polled::Fatal(
                "Message consumption error: FencedInstanceId (static consumer fenced)".into(),
            );
        }
        {
            let mut s = self.lock();
            let now = Instant::now();
            s.tick(now);
            if std::mem::take(&mut s.rebalance_in_poll) {
                // Revoked and assigned again, and records of the new
                // assignment returned, all within this one poll.
                s.leave();
                s.deliver_lost();
                s.join();
            }
            s.deliver_lost();
            if s.member.is_none() && s.rejoin_at.is_none_or(|at| now >= at) {
                s.rejoin_at = None;
                s.join();
            }
            if s.member.is_some() {
                let gap = now.duration_since(s.last_poll);
                s.max_poll_gap = s.max_poll_gap.max(gap);
                s.last_poll = now;
                if let Some(rec) = s.next_record() {
                    return Polled::Record(rec);
                }
            }
        }
        tokio::time::sleep(wait).await;
        Polled::Idle
    }

    fn pause(&self, partitions: &[TopicPartition]) {
        let mut s = self.lock();
        for tp in partitions {
            if s.assigned.contains_key(tp) {
                s.paused.insert(tp.clone());
            }
        }
    }

    fn resume(&self, partitions: &[TopicPartition]) {
        let mut s = self.lock();
        for tp in partitions {
            s.paused.remove(tp);
        }
    }

    fn seek(&self, tp: &TopicPartition, offset: i64) {
        let mut s = self.lock();
        if s.assigned.contains_key(tp) {
            s.positions.insert(tp.clone(), offset);
        }
    }

    fn take_revoked(&self) -> Vec<TopicPartition> {
        std::mem::take(&mut self.lock().revoked)
    }

    fn assignment(&self) -> (u64, HashMap<TopicPartition, Epoch>) {
        let s = self.lock();
        (s.changes, s.assigned.clone())
    }

    fn assignment_changes(&self) -> u64 {
        self.lock().changes
    }

    fn connection(&self) -> (bool, bool) {
        (self.lock().member.is_some(), true)
    }

    fn lag(&self) -> Vec<(TopicPartition, i64)> {
        let s = self.lock();
        s.assigned
            .keys()
            .map(|tp| {
                let end = s.logs.get(tp).map_or(0, |l| l.len() as i64);
                let at = s.committed.get(tp).copied().unwrap_or(0);
                (tp.clone(), end - at)
            })
            .collect()
    }

    fn record_committed(&self, _offsets: &BatchOffsets) {}

    fn group_token(&self) -> Option<GroupToken> {
        let mut s = self.lock();
        s.tick(Instant::now());
        Some(GroupToken {
            membership: s.membership.clone(),
            handle: None,
        })
    }

    fn still_owned(&self, offsets: &BatchOffsets) -> Result<(), TopicPartition> {
        crate::pipeline::record::still_owned(&self.lock().assigned, offsets)
    }

    fn transaction_gate(&self) -> &TransactionGate {
        &self.gate
    }

    async fn committed(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, String> {
        let s = self.lock();
        Ok(partitions
            .iter()
            .filter_map(|tp| s.committed.get(tp).map(|n| (tp.clone(), *n)))
            .collect())
    }
}

impl FakeBroker {
    /// Opens a transaction (after the disruption planned for it, if any);
    /// returns how long it then stalls.
    fn begin_now(&self) -> Duration {
        let mut s = self.lock();
        let n = s.commits + s.aborts + 1;
        let mut stall = Duration::ZERO;
        if let Some(i) = s.disruptions.iter().position(|(at, _)| *at == n) {
            let (_, how) = s.disruptions.remove(i);
            s.leave();
            match how {
                // As if the loop had polled since: revoked and assigned
                // again, under new epochs.
                Disruption::Rejoin => {
                    s.deliver_lost();
                    s.join();
                }
                Disruption::RejoinThenStall { stalls_for } => {
                    s.deliver_lost();
                    s.join();
                    stall = stalls_for;
                }
                Disruption::OtherMemberTakesOver { out_for } => {
                    let ends: Vec<(TopicPartition, i64)> = s
                        .logs
                        .iter()
                        .filter(|(tp, _)| s.kinds.contains_key(&tp.topic))
                        .map(|(tp, l)| (tp.clone(), l.len() as i64))
                        .collect();
                    s.committed.extend(ends);
                    s.rejoin_at = Some(Instant::now() + out_for);
                }
            }
        }
        s.staged = Some(vec![]);
        s.staged_offsets.clear();
        stall
    }
}

#[async_trait]
impl TxnProducer for FakeBroker {
    async fn begin(&self) -> Result<(), CommitError> {
        let stall = self.begin_now();
        if !stall.is_zero() {
            tokio::time::sleep(stall).await;
        }
        Ok(())
    }

    async fn send(&self, o: &OutRecord) -> Result<(), CommitError> {
        let mut s = self.lock();
        let p = s.partition_for(&o.topic, o.key.as_deref());
        let tp = TopicPartition::new(o.topic.as_str(), p);
        let rec = Stored {
            key: o.key.clone(),
            value: o.value.clone(),
            headers: o.headers.clone(),
        };
        match s.staged.as_mut() {
            Some(staged) => {
                staged.push((tp, rec));
                Ok(())
            }
            None => Err(CommitError::Fatal("send outside a transaction".into())),
        }
    }

    async fn send_offsets(
        &self,
        offsets: &BatchOffsets,
        group: &GroupToken,
    ) -> Result<(), CommitError> {
        let mut s = self.lock();
        s.tick(Instant::now());
        let g = &group.membership;
        let unfenced = g.generation == -1 && g.member_id.is_empty();
        if !unfenced && (Some(&g.member_id) != s.member.as_ref() || g.generation != s.generation) {
            return Err(CommitError::Abortable(
                "Broker: Specified group generation id is not valid".into(),
            ));
        }
        s.staged_offsets = offsets
            .iter()
            .map(|(tp, r)| (tp.clone(), r.range.first, r.range.next()))
            .collect();
        Ok(())
    }

    async fn commit(&self) -> Result<(), CommitError> {
        let latency = self.lock().commit_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut s = self.lock();
        let n = s.commits + s.aborts + 1;
        if let Some(i) = s.fail_commits.iter().position(|at| *at == n) {
            s.fail_commits.remove(i);
            return Err(CommitError::Abortable("injected commit failure".into()));
        }
        if let Some(i) = s.fatal_commits.iter().position(|at| *at == n) {
            s.fatal_commits.remove(i);
            // The transaction is gone with the producer.
            s.staged = None;
            s.staged_offsets.clear();
            s.aborts += 1;
            return Err(CommitError::Fatal(
                "Failed to end transaction: Broker: Producer attempted a transactional operation in an invalid state".into(),
            ));
        }
        let abandoned = s
            .abandoned_commits
            .iter()
            .position(|(at, _)| *at == n)
            .map(|i| s.abandoned_commits.remove(i).1);
        if abandoned == Some(false) {
            // The new producer's start aborts it.
            s.staged = None;
            s.staged_offsets.clear();
            s.aborts += 1;
            return Err(CommitError::Abandoned(
                "injected: hung before the broker applied it".into(),
            ));
        }
        let staged = s.staged.take().unwrap_or_default();
        for (tp, rec) in staged {
            s.logs.entry(tp).or_default().push(rec);
        }
        for (tp, first, next) in std::mem::take(&mut s.staged_offsets) {
            let at = s.committed.get(&tp).copied().unwrap_or(0);
            if first != at {
                s.violations.push(format!(
                    "{tp}: a transaction committed offsets {first}..{next} with the group at {at}"
                ));
            }
            s.committed.insert(tp, next);
        }
        s.commits += 1;
        if abandoned == Some(true) {
            return Err(CommitError::Abandoned(
                "injected: hung after the broker applied it".into(),
            ));
        }
        Ok(())
    }

    async fn abort(&self) -> Result<(), CommitError> {
        let mut s = self.lock();
        s.staged = None;
        s.staged_offsets.clear();
        s.aborts += 1;
        Ok(())
    }

    async fn renew(&self, _reason: &str) -> Result<(), CommitError> {
        let mut s = self.lock();
        if s.renewals >= 3 {
            return Err(CommitError::Fatal("renewed too often".into()));
        }
        s.staged = None;
        s.staged_offsets.clear();
        s.renewals += 1;
        Ok(())
    }
}

/// Requests spaced at a rate, in tokio time (the real limiter's clock is
/// the system's, which paused time does not move). A waiter that gives up
/// takes no slot.
pub struct FakeLimiter {
    interval: Duration,
    next_free: Mutex<Instant>,
    max_wait: Mutex<Duration>,
}

impl FakeLimiter {
    pub fn per_minute(n: u32) -> FakeLimiter {
        FakeLimiter {
            interval: Duration::from_secs(60) / n.max(1),
            next_free: Mutex::new(Instant::now()),
            max_wait: Mutex::new(Duration::ZERO),
        }
    }

    /// The longest a call waited for its slot.
    pub fn max_wait(&self) -> Duration {
        *self.max_wait.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn per_second(&self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }

    async fn acquire(&self) {
        let began = Instant::now();
        loop {
            let wait_until = {
                let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if now >= *next {
                    *next = now + self.interval;
                    let mut max = self.max_wait.lock().unwrap_or_else(|p| p.into_inner());
                    *max = (*max).max(now - began);
                    return;
                }
                *next
            };
            tokio::time::sleep_until(wait_until).await;
        }
    }
}

/// A provider that answers every user with data at once after `latency`
/// (or a user's own latency), behind a rate limit, counting calls.
pub struct FakeProvider {
    pub limiter: FakeLimiter,
    pub latency: Duration,
    pub slow: Mutex<HashMap<String, Duration>>,
    /// Users answered with this error instead.
    pub failing: Mutex<HashMap<String, ProviderErrorKind>>,
    /// Bytes of text in each SMS entry.
    pub sms_bytes: usize,
    /// How long a failing user's call sleeps between its retries in all
    /// (as the HTTP retry loop would, waiting on the provider but not
    /// awaiting an answer) before its error comes back.
    pub retry_sleeps: Duration,
    pub calls: AtomicUsize,
    /// Calls answering now, and the most there ever were at once.
    in_call: AtomicUsize,
    pub peak_in_call: AtomicUsize,
}

impl FakeProvider {
    pub fn new(per_minute: u32, latency: Duration) -> FakeProvider {
        FakeProvider {
            limiter: FakeLimiter::per_minute(per_minute),
            latency,
            slow: Mutex::new(HashMap::new()),
            failing: Mutex::new(HashMap::new()),
            sms_bytes: 4,
            retry_sleeps: Duration::ZERO,
            calls: AtomicUsize::new(0),
            in_call: AtomicUsize::new(0),
            peak_in_call: AtomicUsize::new(0),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn failure(&self, provider: Provider, user: &str) -> Result<(), ProviderError> {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match failing.get(user) {
            None => Ok(()),
            Some(kind) => Err(crate::providers::http::error(
                provider,
                *kind,
                None,
                format!("injected {}", kind.as_str()),
            )),
        }
    }

    async fn call(&self, user: &str) {
        self.limiter.acquire().await;
        crate::providers::call::note_sent();
        self.calls.fetch_add(1, Ordering::SeqCst);
        let latency = {
            let slow = self.slow.lock().unwrap_or_else(|p| p.into_inner());
            slow.get(user).copied().unwrap_or(self.latency)
        };
        // Waiting on the provider, as the HTTP retry loop marks it.
        let clock = crate::providers::budget::current();
        let _waiting = clock.as_ref().map(|c| c.waiting());
        let awaiting = clock.as_ref().map(|c| c.awaiting_answer());
        let now = self.in_call.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_call.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(latency).await;
        self.in_call.fetch_sub(1, Ordering::SeqCst);
        drop(awaiting);
        let failing = {
            let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            failing.get(user).is_some_and(|k| k.is_retryable())
        };
        if failing {
            tokio::time::sleep(self.retry_sleeps).await;
        }
    }
}

#[async_trait]
impl FinboxApi for FakeProvider {
    async fn fetch_predictors(&self, customer_id: &str) -> Result<FinboxAnswer, ProviderError> {
        self.call(customer_id).await;
        self.failure(Provider::Finbox, customer_id)?;
        Ok(FinboxAnswer::Complete(FinboxInsights {
            request_id: Some(format!("req-{customer_id}")),
            predictors: vec![Predictor {
                name: "score".into(),
                value: serde_json::json!(1),
                ..Predictor::default()
            }],
            ..FinboxInsights::default()
        }))
    }
}

#[async_trait]
impl CredeauApi for FakeProvider {
    async fn fetch_sms(&self, user_id: &str) -> Result<CredeauAnswer, ProviderError> {
        self.call(user_id).await;
        self.failure(Provider::Credeau, user_id)?;
        let mut entry = serde_json::Map::new();
        entry.insert("sender".into(), serde_json::json!("BANK"));
        entry.insert("body".into(), serde_json::json!("x".repeat(self.sms_bytes)));
        let entry =
            crate::providers::SmsEntry::from_json(serde_json::Value::Object(entry).to_string())
                .expect("a map encodes");
        Ok(CredeauAnswer::Data(SmsExtraction {
            entries: vec![entry],
            cnt_sms_threshold: Some(5000),
            ..SmsExtraction::default()
        }))
    }
}
