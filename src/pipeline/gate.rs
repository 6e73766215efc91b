//! The byte budget (`schedule.max_in_flight_bytes`) at the start of a
//! record's work. A record's answers, decoded answers and outputs live from
//! its start until its batch's transaction takes the outputs, so the loop
//! lets a record start only while what the outputs held for a transaction
//! cost, plus what the records running are expected to hold, fit the
//! budget. Pausing the partitions at the budget alone came too late: every
//! record read before the pause was started, and with answers of a
//! megabyte a read-ahead of hundreds of records held hundreds of
//! megabytes.
//!
//! What a running record will hold is not known until it ends, so it is
//! expected to hold [`RUNNING_COST`] times what records output lately
//! ([`OutputSizes`]); outputs held cost [`HELD_COST`] times their size.
//!
//! Records start in read order. The oldest record not yet finished starts
//! budget or not when no transaction is in flight: the outputs held wait
//! for their batch to commit, and their batch may wait for just that
//! record (the loop commits the done head of a batch on its own when the
//! outputs held reach half the budget). So the gate never deadlocks, and
//! at most one record runs beyond the budget at a time: an answer larger
//! than the budget is worked on alone.
//!
//! An answer's size is known only once it comes, so the records running
//! also count the answer bytes they read ([`ANSWER_COST`] times them, when
//! that is more than the mean expects): one large answer stops further
//! starts from its first bytes. An answer that announces (Content-Length)
//! a large part of the budget ([`LARGE_SHARE`]) waits unread in its
//! connection until the budget has room for it or its record is the
//! oldest unfinished (at most its provider's `body_stall_timeout`), and
//! the allocator's freed pages are given back before it is read and after
//! its record ends (`crate::memory`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use crate::providers::budget::{AnswerLedger, RecordClock};

/// What a record is assumed to output at the gate before any record has
/// finished: a backlog of large answers must not all start at once, and
/// small outputs bring the mean down within a few dozen records.
const GATE_PRIOR: f64 = 1_048_576.0;

/// What a running record holds at its peak, in multiples of what it will
/// output: its answer's body, the entries decoded from it, and the
/// encoded output, each about the output's size (Credeau's SMS pass
/// through as JSON text).
const RUNNING_COST: f64 = 3.0;

/// What a running record holds at its peak, in multiples of the answer
/// bytes it has read: the body and the entries decoded from it, then the
/// entries and the encoded output. Counted as the bytes arrive, so an
/// answer far larger than the mean stops further starts while it is being
/// read, not after its record has ended.
const ANSWER_COST: f64 = 2.0;

/// An answer whose cost ([`ANSWER_COST`] times its announced length) is
/// over this share of the budget waits, before it is read, until the
/// budget has room for it: with 64 MiB, answers over 8 MiB.
const LARGE_SHARE: f64 = 0.25;

/// What outputs held for a transaction cost, in multiples of their size:
/// ours until they are produced; then librdkafka's copy, the batches it
/// compresses them into, and for a moment our freed pages too (jemalloc
/// purges them within a quarter of a second). At 1.5 a 10,000-user
/// backlog of realistic answers peaked 0.8 MiB under 64 MiB plus the
/// budget (docs/benchmarks.md).
const HELD_COST: f64 = 2.0;

/// The mean bytes of output of the records finished lately (weight 1/16
/// on each new record), twice: one that starts at the first record's size,
/// for the read-ahead, and one for the gate that counts [`GATE_PRIOR`] as
/// a first record (weight 1/(n+1) on the n-th record, until that is 1/16).
/// The gate's keeps the prior in because the first records to finish are
/// not a fair sample: with answers of every size the small ones finish
/// first, and a mean from the first alone let fifty records of a megabyte
/// start at once. It does not keep it long: records that wait for a rate
/// limit hold little, and a prior that lingered kept them from starting.
#[derive(Debug)]
pub struct OutputSizes {
    /// The read-ahead's mean's `f64` bits; NaN until a record finished.
    bits: AtomicU64,
    /// The gate's mean's `f64` bits.
    gate_bits: AtomicU64,
    /// Records observed.
    observed: AtomicU64,
}

impl Default for OutputSizes {
    fn default() -> Self {
        OutputSizes {
            bits: AtomicU64::new(f64::NAN.to_bits()),
            gate_bits: AtomicU64::new(GATE_PRIOR.to_bits()),
            observed: AtomicU64::new(0),
        }
    }
}

impl OutputSizes {
    const WEIGHT: f64 = 1.0 / 16.0;

    pub fn observe(&self, bytes: usize) {
        let bytes = bytes as f64;
        let step = |weight: f64| {
            move |old: u64| {
                let old = f64::from_bits(old);
                let new = if old.is_nan() {
                    bytes
                } else {
                    old + (bytes - old) * weight
                };
                Some(new.to_bits())
            }
        };
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, step(Self::WEIGHT));
        let n = self.observed.fetch_add(1, Ordering::Relaxed) + 1;
        let weight = (1.0 / (n as f64 + 1.0)).max(Self::WEIGHT);
        let _ = self
            .gate_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, step(weight));
    }

    /// The mean, or `prior` before any record finished.
    pub fn mean_or(&self, prior: f64) -> f64 {
        let mean = f64::from_bits(self.bits.load(Ordering::Relaxed));
        if mean.is_nan() {
            prior
        } else {
            mean
        }
    }

    /// The gate's mean: from [`GATE_PRIOR`] towards what records output.
    pub fn gate_mean(&self) -> f64 {
        f64::from_bits(self.gate_bits.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Tickets not yet dropped, by read order.
    unfinished: BTreeSet<u64>,
    /// Tickets not yet past the gate, by read order: they pass in it.
    waiting: BTreeSet<u64>,
    /// Tickets past the gate and not yet dropped.
    started: usize,
    /// How to wake each ticket waiting to pass. Only the first in line can
    /// pass, so only it is woken: waking every waiter on every change cost
    /// each start a pass over all the records read ahead.
    wakers: HashMap<u64, Waker>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct StartGate {
    budget: usize,
    held: AtomicUsize,
    /// The answer bytes the running records have read.
    answers: AtomicU64,
    sizes: OutputSizes,
    state: Mutex<State>,
    /// Transactions in flight (0 or 1).
    transactions: AtomicUsize,
    /// Told of every change that may make room for a large answer.
    room_changed: tokio::sync::Notify,
    /// Large answers, by whether they waited (`StartGate::count_large_answers`).
    large_answers: std::sync::OnceLock<prometheus::IntCounterVec>,
}

impl StartGate {
    pub fn new(budget: usize) -> Arc<StartGate> {
        Arc::new(StartGate {
            budget: budget.max(1),
            held: AtomicUsize::new(0),
            answers: AtomicU64::new(0),
            sizes: OutputSizes::default(),
            state: Mutex::new(State::default()),
            transactions: AtomicUsize::new(0),
            room_changed: tokio::sync::Notify::new(),
            large_answers: std::sync::OnceLock::new(),
        })
    }

    /// A ticket for the next record read; taken in read order.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let seq = {
            let mut st = self.lock();
            let seq = st.next;
            st.next += 1;
            st.unfinished.insert(seq);
            st.waiting.insert(seq);
            seq
        };
        Ticket {
            gate: self.clone(),
            seq,
            started: false,
        }
    }

    /// Counts a finished record's outputs as held until the returned value
    /// is dropped (when the transaction takes them), and in the mean.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> HeldBytes {
        self.sizes.observe(bytes);
        let bytes = (bytes as f64 * HELD_COST) as usize;
        self.held.fetch_add(bytes, Ordering::Relaxed);
        HeldBytes {
            bytes,
            gate: self.clone(),
        }
    }

    /// Counts a transaction as in flight until the returned value is
    /// dropped: meanwhile the oldest record waits for the budget like the
    /// others, as the transaction's end frees what it held.
    pub fn transaction(self: &Arc<Self>) -> InTransaction {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        InTransaction { gate: self.clone() }
    }

    /// A clock for the provider calls of `ticket`'s record that counts the
    /// answer bytes they read at the gate until the returned guard is
    /// dropped, and makes a large answer wait for room
    /// ([`StartGate::has_room`]).
    pub fn record_clock(self: &Arc<Self>, ticket: &Ticket) -> (Arc<RecordClock>, CountedAnswers) {
        let clock = RecordClock::metered(Arc::new(RecordLedger {
            gate: self.clone(),
            seq: ticket.seq,
        }));
        let counted = CountedAnswers {
            clock: clock.clone(),
            gate: self.clone(),
        };
        (clock, counted)
    }

    /// Bytes of outputs held for a transaction now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// What records output lately, or `prior` before any finished.
    pub fn mean_output_or(&self, prior: f64) -> f64 {
        self.sizes.mean_or(prior)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the first ticket in line, if it waits: what changed may let
    /// it pass.
    fn wake_first(&self) {
        self.room_changed.notify_waiters();
        let waker = {
            let st = self.lock();
            st.waiting
                .first()
                .and_then(|seq| st.wakers.get(seq))
                .cloned()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether record `seq` may read a large answer ([`LARGE_SHARE`];
    /// counted among the answers already): yes when the budget has room
    /// for it beside what is held and running, when the record is the
    /// oldest unfinished and no transaction is in flight (what younger
    /// records hold waits for it), or when the record has ended (a call of
    /// a cut record, parked, reads on uncounted).
    fn has_room(&self, seq: u64) -> bool {
        let st = self.lock();
        if !st.unfinished.contains(&seq) {
            return true;
        }
        if st.unfinished.first() == Some(&seq) && self.transactions.load(Ordering::Relaxed) == 0 {
            return true;
        }
        self.held() as f64 + self.running_cost(&st) <= self.budget as f64
    }

    /// What a record is expected to hold while it runs.
    fn one_running(&self) -> f64 {
        self.sizes.gate_mean() * RUNNING_COST
    }

    /// What the records running are expected to hold: what records hold on
    /// average, or more when the answers they have read say so.
    fn running_cost(&self, st: &State) -> f64 {
        let answers = self.answers.load(Ordering::Relaxed) as f64;
        (st.started as f64 * self.one_running()).max(answers * ANSWER_COST)
    }

    /// Counts large answers in `counter`, by a `waited` label: `false`
    /// (room at once), `true` (waited for it), `capped` (read after
    /// waiting as long as the provider's `body_stall_timeout`).
    pub fn count_large_answers(&self, counter: prometheus::IntCounterVec) {
        let _ = self.large_answers.set(counter);
    }

    /// Whether answers of `bytes` are a large part of the budget
    /// ([`LARGE_SHARE`]).
    fn is_large(&self, bytes: u64) -> bool {
        bytes as f64 * ANSWER_COST > self.budget as f64 * LARGE_SHARE
    }

    fn try_start(&self, st: &mut State, seq: u64) -> bool {
        if st.waiting.first() != Some(&seq) {
            // Records start in read order: one started ahead of an older
            // one would hold its outputs while its batch waits for the
            // older, and the budget would fill with outputs nothing can
            // commit.
            return false;
        }
        let oldest =
            st.unfinished.first() == Some(&seq) && self.transactions.load(Ordering::Relaxed) == 0;
        // The one starting is expected to hold what records hold on
        // average.
        let expected = self.running_cost(st) + self.one_running();
        if oldest || self.held() as f64 + expected <= self.budget as f64 {
            st.started += 1;
            st.waiting.remove(&seq);
            st.wakers.remove(&seq);
            true
        } else {
            false
        }
    }
}

/// A record's place at the gate, from its read until its work ends.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<StartGate>,
    seq: u64,
    started: bool,
}

impl Ticket {
    /// Waits until the record may start (see the module documentation).
    pub async fn pass(&mut self) {
        if self.started {
            return;
        }
        let (gate, seq) = (&self.gate, self.seq);
        std::future::poll_fn(|cx| {
            let mut st = gate.lock();
            if gate.try_start(&mut st, seq) {
                drop(st);
                // The next in line may fit too.
                gate.wake_first();
                Poll::Ready(())
            } else {
                st.wakers.insert(seq, cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        self.started = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut st = self.gate.lock();
            st.unfinished.remove(&self.seq);
            st.waiting.remove(&self.seq);
            st.wakers.remove(&self.seq);
            if self.started {
                st.started -= 1;
            }
        }
        self.gate.wake_first();
    }
}

/// One record's answer bytes at the gate, and where its large answers wait
/// for room (see [`StartGate::has_room`]).
#[derive(Debug)]
struct RecordLedger {
    gate: Arc<StartGate>,
    seq: u64,
}

impl AnswerLedger for RecordLedger {
    fn add(&self, n: u64) {
        self.gate.answers.fetch_add(n, Ordering::Relaxed);
    }

    fn remove(&self, n: u64) {
        self.gate.answers.fetch_sub(n, Ordering::Relaxed);
    }

    fn room_for(
        &self,
        bytes: u64,
        cap: std::time::Duration,
    ) -> Option<futures::future::BoxFuture<'_, ()>> {
        if !self.gate.is_large(bytes) {
            return None;
        }
        Some(Box::pin(async move {
            let until = tokio::time::Instant::now() + cap;
            let mut waited = "false";
            loop {
                let changed = self.gate.room_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.gate.has_room(self.seq) {
                    break;
                }
                waited = "true";
                if tokio::time::timeout_at(until, changed).await.is_err() {
                    waited = "capped";
                    break;
                }
            }
            if let Some(c) = self.gate.large_answers.get() {
                c.with_label_values(&[waited]).inc();
            }
            // Freed pages of the records before it go back first, not on
            // top of it.
            crate::memory::return_freed();
        }))
    }
}

/// A record's answer bytes, counted at the gate while this lives.
#[derive(Debug)]
pub struct CountedAnswers {
    clock: Arc<RecordClock>,
    gate: Arc<StartGate>,
}

impl Drop for CountedAnswers {
    fn drop(&mut self) {
        let bytes = self.clock.let_go_of_answers();
        if self.gate.is_large(bytes) {
            // The record's answers and their entries are freed now: their
            // pages go back at once rather than lie freed beside the next.
            crate::memory::return_freed();
        }
        self.gate.wake_first();
    }
}

/// Outputs held for a transaction, counted at the gate while this lives.
#[derive(Debug)]
pub struct HeldBytes {
    bytes: usize,
    gate: Arc<StartGate>,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.gate.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.gate.wake_first();
    }
}

/// A transaction in flight, counted at the gate while this lives.
#[derive(Debug)]
pub struct InTransaction {
    gate: Arc<StartGate>,
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        self.gate.transactions.fetch_sub(1, Ordering::Relaxed);
        self.gate.wake_first();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_mean_starts_at_the_first_record_and_follows_later_ones() {
        let s = OutputSizes::default();
        assert_eq!(s.mean_or(7.0), 7.0);
        assert_eq!(s.gate_mean(), GATE_PRIOR);
        s.observe(1600);
        assert_eq!(s.mean_or(7.0), 1600.0);
        // The gate's mean counts its prior as a first record.
        assert_eq!(s.gate_mean(), (GATE_PRIOR + 1600.0) / 2.0);
        s.observe(0);
        assert_eq!(s.mean_or(7.0), 1500.0);
    }

    /// A gate whose records output about 1,000 bytes lately, so a running
    /// record is expected to hold about 3,000 (`RUNNING_COST`).
    fn gate_of_1000_byte_outputs(budget: usize) -> Arc<StartGate> {
        let gate = StartGate::new(budget);
        for _ in 0..300 {
            drop(gate.hold(1000));
        }
        let mean = gate.sizes.gate_mean();
        assert!((1000.0..1001.0).contains(&mean), "{mean}");
        gate
    }

    /// Whether `ticket` is still waiting to pass after 100 ms.
    async fn still_waits(ticket: &mut Ticket) -> bool {
        tokio::time::timeout(Duration::from_millis(100), ticket.pass())
            .await
            .is_err()
    }

    /// `ticket` passing in the background; the handle ends once it has.
    fn passing(mut ticket: Ticket) -> tokio::task::JoinHandle<Ticket> {
        tokio::spawn(async move {
            ticket.pass().await;
            ticket
        })
    }

    #[tokio::test(start_paused = true)]
    async fn records_start_while_their_expected_outputs_fit_and_the_oldest_always_starts() {
        let gate = gate_of_1000_byte_outputs(9100);
        let mut tickets: Vec<Ticket> = (0..5).map(|_| gate.ticket()).collect();
        for t in tickets.iter_mut().take(3) {
            t.pass().await;
        }
        // A fourth would make 12,000 bytes expected: it waits.
        let waiting = passing(tickets.remove(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        // The first finishes and holds 1,000 bytes of outputs: 2,000 held
        // (`HELD_COST`) plus 3 × 3,000 expected is still over.
        let held = gate.hold(1000);
        drop(tickets.remove(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        // Its transaction takes the outputs: the fourth starts.
        drop(held);
        let fourth = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("started once the outputs were taken")
            .unwrap();
        // Over budget, the oldest unfinished record still starts, and only
        // it.
        let _big = gate.hold(1 << 20);
        drop(fourth);
        let mut oldest = tickets.pop().expect("the fifth ticket");
        let mut younger = gate.ticket();
        drop(tickets);
        tokio::time::timeout(Duration::from_secs(1), oldest.pass())
            .await
            .expect("the oldest unfinished record always starts");
        assert!(still_waits(&mut younger).await, "a younger one waits");
    }

    #[tokio::test(start_paused = true)]
    async fn records_start_in_read_order() {
        let gate = gate_of_1000_byte_outputs(1 << 20);
        let mut older = gate.ticket();
        let mut younger = gate.ticket();
        // The younger fits, but the older has not started.
        assert!(
            still_waits(&mut younger).await,
            "started ahead of an older record"
        );
        let waiting = passing(younger);
        older.pass().await;
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the younger starts once the older has")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_budget_the_oldest_waits_for_a_transaction_in_flight() {
        let gate = gate_of_1000_byte_outputs(9100);
        let _held = gate.hold(100_000);
        let transaction = gate.transaction();
        let mut oldest = gate.ticket();
        assert!(
            still_waits(&mut oldest).await,
            "the transaction's end frees what it held: the oldest waits for it"
        );
        let waiting = passing(oldest);
        drop(transaction);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("with no transaction in flight the oldest starts over the budget")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_answer_stops_starts_as_it_arrives_until_its_record_lets_go() {
        let gate = gate_of_1000_byte_outputs(9100);
        let mut first = gate.ticket();
        first.pass().await;
        let (clock, counted) = gate.record_clock(&first);
        // 3,000 expected for the first, 3,000 for a second: it would fit.
        // But the first's answer is arriving, 10,000 bytes so far.
        clock.answer_arrived(10_000);
        let mut second = gate.ticket();
        assert!(
            still_waits(&mut second).await,
            "started while a large answer was arriving"
        );
        let waiting = passing(second);
        // The record ends and lets go of its answer (its outputs, if any,
        // are counted as held from then on).
        drop(counted);
        let mut second = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("started once the large answer was let go of")
            .unwrap();
        // Bytes read afterwards by a call still going count no more.
        clock.answer_arrived(50_000);
        assert_eq!(gate.answers.load(Ordering::Relaxed), 0);
        second.pass().await;
        drop(first);
    }

    /// A 64 KiB budget (an answer waits when twice its length is over
    /// 16 KiB) with two records running: an older one, and one whose clock
    /// reads a large answer.
    async fn older_and_large() -> (
        Arc<StartGate>,
        Ticket,
        Ticket,
        Arc<RecordClock>,
        CountedAnswers,
    ) {
        let gate = gate_of_1000_byte_outputs(64 << 10);
        let mut older = gate.ticket();
        older.pass().await;
        let mut large = gate.ticket();
        large.pass().await;
        let (clock, counted) = gate.record_clock(&large);
        (gate, older, large, clock, counted)
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_answer_waits_for_room_or_until_its_record_is_the_oldest() {
        let (gate, older, _large, clock, _counted) = older_and_large().await;
        // Small answers never wait.
        tokio::time::timeout(
            Duration::from_millis(1),
            clock.make_room(8 << 10, Duration::from_secs(60)),
        )
        .await
        .expect("a small answer waited");
        // 40 KiB announced, with 50 KiB of outputs held: over the budget.
        let held = gate.hold(25 << 10);
        let mut reading = Box::pin(clock.make_room(40 << 10, Duration::from_secs(60)));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut reading)
                .await
                .is_err(),
            "read a large answer over the budget"
        );
        // Meanwhile no other record starts.
        let mut younger = gate.ticket();
        assert!(
            still_waits(&mut younger).await,
            "started beside a large answer waiting"
        );
        // The older record ends: the large one is the oldest, and reads.
        drop(older);
        tokio::time::timeout(Duration::from_secs(1), &mut reading)
            .await
            .expect("the oldest record read its large answer");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_answer_reads_once_the_budget_has_room() {
        let (gate, older, _large, clock, _counted) = older_and_large().await;
        let held = gate.hold(25 << 10);
        let mut reading = Box::pin(clock.make_room(20 << 10, Duration::from_secs(60)));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut reading)
                .await
                .is_err()
        );
        // The held outputs' transaction ends: 40 KiB for the answer and
        // 3,000 for the older record fit 64 KiB.
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), &mut reading)
            .await
            .expect("read once the budget had room");
        // And it waits no longer than its cap, whatever the budget.
        let _held = gate.hold(1 << 20);
        tokio::time::timeout(
            Duration::from_secs(11),
            clock.make_room(30 << 10, Duration::from_secs(10)),
        )
        .await
        .expect("waited beyond its cap");
        drop(older);
    }
}
