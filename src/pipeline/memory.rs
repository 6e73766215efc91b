//! Gives freed heap memory back to the system.
//!
//! A backlog (a deploy after an outage, a replay, a burst of onboardings)
//! makes librdkafka and the runtime allocate fetch buffers, records and
//! futures by the tens of megabytes; once it is worked off, glibc's malloc
//! keeps most of those pages (free chunks inside its arenas are only handed
//! back from the top of each heap), so the resident size would stay at the
//! backlog's peak for as long as the process lives, while users that merely
//! wait cost nothing. A periodic `malloc_trim(0)` returns every whole free
//! page of every arena, so the resident size follows the work in hand.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the heap is trimmed. A trim walks the arenas under their
/// locks: well under a millisecond here, so every few seconds costs
/// nothing measurable and the resident size settles soon after a backlog.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Trims the heap every [`TRIM_INTERVAL`] until `shutdown`.
pub fn spawn_trimmer(shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Off the runtime's workers: a trim holds the arena locks.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    })
}

/// Returns free heap pages to the system; true when some were returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim only reads and updates glibc's own allocator
    // state under its arena locks; it takes no pointers from us.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return memory by themselves (or offer no such call).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_after_freeing_many_small_blocks_returns_pages() {
        // Many small blocks (below the mmap threshold, so they live in the
        // heap) with one kept at the end, so the top of the heap stays in use
        // and only a trim, not free(), can hand the pages back.
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 1024]).collect();
        let keep = vec![1u8; 1024];
        drop(blocks);
        assert!(
            trim(),
            "20 MB of freed heap blocks, yet nothing was returned"
        );
        assert_eq!(keep[0], 1);
    }
}
