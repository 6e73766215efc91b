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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// What a record is assumed to output at the gate before any record has
/// finished: a backlog of large answers must not all start at once, and
/// small outputs bring the mean down within a few dozen records.
const GATE_PRIOR: f64 = 1_048_576.0;

/// What a running record holds at its peak, in multiples of what it will
/// output: its answer's body, the entries decoded from it, and the
/// encoded output, each about the output's size (Credeau's SMS pass
/// through as JSON text).
const RUNNING_COST: f64 = 3.0;

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
    sizes: OutputSizes,
    state: Mutex<State>,
    /// Transactions in flight (0 or 1).
    transactions: AtomicUsize,
}

impl StartGate {
    pub fn new(budget: usize) -> Arc<StartGate> {
        Arc::new(StartGate {
            budget: budget.max(1),
            held: AtomicUsize::new(0),
            sizes: OutputSizes::default(),
            state: Mutex::new(State::default()),
            transactions: AtomicUsize::new(0),
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
        let expected = (st.started + 1) as f64 * self.sizes.gate_mean() * RUNNING_COST;
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
}
