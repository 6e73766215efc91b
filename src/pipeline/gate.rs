//! The byte budget (`schedule.max_in_flight_bytes`) at the start of a
//! record's work. A record's answers, decoded answers and outputs live from
//! its start until its batch's transaction takes the outputs, so the loop
//! lets a record start only while the outputs held for a transaction, plus
//! what the records already started are expected to output, fit the
//! budget. Pausing the partitions at the budget alone came too late: every
//! record read before the pause was started, and with answers of a
//! megabyte a read-ahead of hundreds of records held hundreds of
//! megabytes.
//!
//! What a started record will output is not known until it ends, so it is
//! expected to output what records output lately ([`OutputSizes`]).
//!
//! The oldest record not yet finished always starts, budget or not: the
//! outputs held wait for their batch to commit, and their batch may wait
//! for just that record. So the gate never deadlocks, and at most one
//! record runs beyond the budget at a time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What a record is assumed to output at the gate before any record has
/// finished: a backlog of large answers must not all start at once, and
/// small outputs bring the mean down within a few dozen records.
const GATE_PRIOR: f64 = 1_048_576.0;

/// The mean bytes of output of the records finished lately (weight 1/16
/// on each new record; the first record's size at first).
#[derive(Debug)]
pub struct OutputSizes {
    /// The mean's `f64` bits; NaN until a record finished.
    bits: AtomicU64,
}

impl Default for OutputSizes {
    fn default() -> Self {
        OutputSizes {
            bits: AtomicU64::new(f64::NAN.to_bits()),
        }
    }
}

impl OutputSizes {
    const WEIGHT: f64 = 1.0 / 16.0;

    pub fn observe(&self, bytes: usize) {
        let bytes = bytes as f64;
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let old = f64::from_bits(old);
                let new = if old.is_nan() {
                    bytes
                } else {
                    old + (bytes - old) * Self::WEIGHT
                };
                Some(new.to_bits())
            });
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
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Tickets not yet dropped, by read order.
    unfinished: BTreeSet<u64>,
    /// Tickets past the gate and not yet dropped.
    started: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct StartGate {
    budget: usize,
    held: AtomicUsize,
    sizes: OutputSizes,
    state: Mutex<State>,
    changed: Notify,
}

impl StartGate {
    pub fn new(budget: usize) -> Arc<StartGate> {
        Arc::new(StartGate {
            budget: budget.max(1),
            held: AtomicUsize::new(0),
            sizes: OutputSizes::default(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        })
    }

    /// A ticket for the next record read; taken in read order.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let seq = {
            let mut st = self.lock();
            let seq = st.next;
            st.next += 1;
            st.unfinished.insert(seq);
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
        self.held.fetch_add(bytes, Ordering::Relaxed);
        HeldBytes {
            bytes,
            gate: self.clone(),
        }
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

    fn try_start(&self, seq: u64) -> bool {
        let mut st = self.lock();
        let oldest = st.unfinished.first() == Some(&seq);
        let expected = (st.started + 1) as f64 * self.sizes.mean_or(GATE_PRIOR);
        if oldest || self.held() as f64 + expected <= self.budget as f64 {
            st.started += 1;
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
        loop {
            let notified = self.gate.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.gate.try_start(self.seq) {
                self.started = true;
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut st = self.gate.lock();
            st.unfinished.remove(&self.seq);
            if self.started {
                st.started -= 1;
            }
        }
        self.gate.changed.notify_waiters();
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
        self.gate.changed.notify_waiters();
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
        s.observe(1600);
        assert_eq!(s.mean_or(7.0), 1600.0);
        s.observe(0);
        assert_eq!(s.mean_or(7.0), 1500.0);
    }

    #[tokio::test(start_paused = true)]
    async fn records_start_while_their_expected_outputs_fit_and_the_oldest_always_starts() {
        let gate = StartGate::new(3000);
        // Records output 1,000 bytes lately.
        drop(gate.hold(1000));
        let mut tickets: Vec<Ticket> = (0..5).map(|_| gate.ticket()).collect();
        for t in tickets.iter_mut().take(3) {
            t.pass().await;
        }
        // A fourth would expect 4,000 bytes: it waits.
        let mut fourth = tickets.remove(3);
        let waiting = tokio::spawn(async move {
            fourth.pass().await;
            fourth
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        // The first finishes and holds 1,000 bytes of outputs: 1,000 held
        // plus 3 × 1,000 expected is still over.
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
        assert!(
            tokio::time::timeout(Duration::from_millis(100), younger.pass())
                .await
                .is_err(),
            "a younger one waits"
        );
    }
}
