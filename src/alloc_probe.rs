//! Test builds of the library only: a global allocator that remembers the largest single
//! block each thread asked for, so tests can check that hostile input cannot make the
//! node allocate what a length prefix claims.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

/// Forgets this thread's largest block so far.
pub fn reset() {
    PEAK.with(|p| p.set(0));
}

/// The largest block this thread allocated since [`reset`].
pub fn peak() -> usize {
    PEAK.with(|p| p.get())
}

fn note(size: usize) {
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

struct Probe;

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        unsafe { System.dealloc(ptr, l) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(ptr, l, new) }
    }
}

#[global_allocator]
static PROBE: Probe = Probe;
