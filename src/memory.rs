//! Giving freed pages back to the system at once. The allocator keeps
//! freed pages for a while before it returns them (`dirty_decay_ms` in
//! src/main.rs), which is cheap for the many small buffers a record uses
//! and costly when a large answer comes: a 30 MB answer arriving beside a
//! quarter of a second of other records' freed pages peaked tens of
//! megabytes above what was allocated. The pipeline asks for the freed
//! pages back around a large answer only (see `pipeline::gate`).

use std::sync::OnceLock;

static RETURN_FREED: OnceLock<fn()> = OnceLock::new();

/// Sets how freed pages are given back: the binary's allocator knows how
/// (jemalloc's `arena.<all>.purge`). Once; later calls are ignored.
pub fn set_return_freed(f: fn()) {
    let _ = RETURN_FREED.set(f);
}

/// Gives the allocator's freed pages back to the system now (nothing when
/// no way was set).
pub fn return_freed() {
    if let Some(f) = RETURN_FREED.get() {
        f();
    }
}
