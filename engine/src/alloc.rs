//! The node's allocator: the system's for small blocks, a mapping of its own for every large
//! one.
//!
//! A connection's big blocks — its socket buffers (256 KiB each by default) and its send
//! mirror — are allocated zeroed and mostly left untouched while the connection idles
//! (compaction, `flowshift_core::stack`, re-homes an idle connection into fresh ones). What
//! an idle connection costs is the pages of those blocks that are resident, so they must
//! cost nothing until written and go back to the kernel when freed. glibc's `malloc` maps
//! large blocks on their own too (above `M_MMAP_THRESHOLD`), but it writes a header into the
//! first page of each — 4 KiB resident per buffer, 8 KiB per idle connection — and stops
//! mapping after `M_MMAP_MAX` (65,536) live mappings, falling back to its heap, where a
//! zeroed block is zeroed by hand and every page becomes resident: a node with 100,000
//! connections would hold all their buffers.
//!
//! [`NodeAlloc`] maps every block of [`LARGE`] bytes or more itself (`mmap`, page-aligned,
//! no header: Rust passes the size back on free, so none is needed), grows and shrinks them
//! with `mremap` (no copy), and unmaps them on free. Smaller blocks go to the system
//! allocator. Adjacent anonymous mappings merge into one kernel VMA: 100,000 idle
//! connections took 6,600 mappings in the benchmark. Churn leaves holes that do not merge,
//! though, and the kernel's limit (`vm.max_map_count`, 65,530 by default) is then within
//! reach of a node near `max_connections`: the node warns at start when the limit is below
//! three mappings per connection, and `/metrics` shows the mapping count and any refusal.
//! (Carving blocks from one reserved region would remove the limit: not done yet.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Large blocks the kernel refused to map (the allocation then fails, and Rust aborts).
static MAP_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Large blocks the kernel refused to unmap (their memory stays mapped). Near
/// `vm.max_map_count`, unmapping the middle of a merged mapping needs a split it may refuse.
static UNMAP_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many large blocks the kernel refused to map and to unmap since start (for
/// `/metrics`: either is a sign that `vm.max_map_count` is too low for the node's load).
pub fn failures() -> (u64, u64) {
    (
        MAP_FAILURES.load(Ordering::Relaxed),
        UNMAP_FAILURES.load(Ordering::Relaxed),
    )
}

/// The mappings the process has now (lines of `/proc/self/maps`), if it can be read.
pub fn mappings() -> Option<u64> {
    let maps = std::fs::read("/proc/self/maps").ok()?;
    Some(maps.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// Blocks at least this large get a mapping of their own.
pub const LARGE: usize = 32 * 1024;

/// Alignment every mapping has (the smallest page size of the platforms we run on). Larger
/// alignments go to the system allocator.
const MAP_ALIGN: usize = 4096;

/// See the module docs. Install it in a binary with `#[global_allocator]`.
pub struct NodeAlloc;

fn mapped(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= MAP_ALIGN
}

/// `size` rounded up to whole pages (the kernel maps whole pages; the rounding is only for
/// `munmap`/`mremap`, which want the length mapped).
fn pages(size: usize) -> usize {
    size.div_ceil(MAP_ALIGN) * MAP_ALIGN
}

/// A fresh private anonymous mapping of `size` bytes (zeroed by the kernel), or null.
fn map(size: usize) -> *mut u8 {
    // SAFETY: a new anonymous mapping does not alias any memory of the process.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            pages(size),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        MAP_FAILURES.fetch_add(1, Ordering::Relaxed);
        ptr::null_mut()
    } else {
        p.cast()
    }
}

// SAFETY: every block of `LARGE` bytes or more (with an alignment a page satisfies) is a
// mapping of its own, created by `map` and released only by `dealloc` or `realloc` with the
// same size the caller was given (GlobalAlloc's contract: the layout on free is the layout of
// the allocation); every other block is the system allocator's, from allocation to free. A
// block never changes hands between the two except through `realloc`, which copies.
unsafe impl GlobalAlloc for NodeAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // A fresh anonymous mapping reads as zeroes and none of its pages is resident.
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if mapped(&layout) {
            // SAFETY: `p` is a mapping of `pages(layout.size())` bytes made by `map` (see
            // the impl's comment), and the caller gives up the block.
            if unsafe { libc::munmap(p.cast(), pages(layout.size())) } != 0 {
                UNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // SAFETY: forwarded with the caller's pointer and layout.
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(&layout), mapped(&new)) {
            (false, false) => {
                // SAFETY: forwarded with the caller's arguments.
                unsafe { System.realloc(p, layout, new_size) }
            }
            (true, true) => {
                // The kernel moves the pages if it must; nothing is copied.
                // SAFETY: `p` is a mapping of `pages(layout.size())` bytes made by `map`.
                let q = unsafe {
                    libc::mremap(
                        p.cast(),
                        pages(layout.size()),
                        pages(new_size),
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if q == libc::MAP_FAILED {
                    MAP_FAILURES.fetch_add(1, Ordering::Relaxed);
                    ptr::null_mut()
                } else {
                    q.cast()
                }
            }
            _ => {
                // Across the threshold: a new block of the other kind, and a copy.
                // SAFETY: `new` is a valid layout of non-zero size (`layout`'s was).
                let q = unsafe { self.alloc(new) };
                if !q.is_null() {
                    // SAFETY: both blocks hold at least the smaller size and do not overlap;
                    // the old one is freed with the layout it was allocated with.
                    unsafe {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, writes, grows across and within the threshold, shrinks and frees through
    /// [`NodeAlloc`] directly, checking the bytes survive every step.
    #[test]
    fn blocks_keep_their_bytes_through_every_kind_of_realloc() {
        let a = NodeAlloc;
        let fill = |p: *mut u8, n: usize| {
            for i in 0..n {
                // SAFETY: the test owns `n` bytes at `p`.
                unsafe { *p.add(i) = (i % 251) as u8 };
            }
        };
        let check = |p: *mut u8, n: usize| {
            // SAFETY: the test owns at least `n` bytes at `p`.
            (0..n).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
        };
        // SAFETY: every block is used within its size and freed with its layout.
        unsafe {
            let l = Layout::from_size_align(1000, 8).unwrap();
            let p = a.alloc(l);
            assert!(!p.is_null());
            fill(p, 1000);
            // small → large
            let p = a.realloc(p, l, 40_000);
            assert!(!p.is_null() && check(p, 1000));
            fill(p, 40_000);
            // large → larger (mremap)
            let l = Layout::from_size_align(40_000, 8).unwrap();
            let p = a.realloc(p, l, 200_000);
            assert!(!p.is_null() && check(p, 40_000));
            fill(p, 200_000);
            // large → small
            let l = Layout::from_size_align(200_000, 8).unwrap();
            let p = a.realloc(p, l, 500);
            assert!(!p.is_null() && check(p, 500));
            a.dealloc(p, Layout::from_size_align(500, 8).unwrap());

            // A zeroed large block reads as zeroes and is page-aligned.
            let l = Layout::from_size_align(65_536, 1).unwrap();
            let z = a.alloc_zeroed(l);
            assert!(!z.is_null());
            assert_eq!(z as usize % MAP_ALIGN, 0);
            assert!((0..65_536).all(|i| *z.add(i) == 0));
            a.dealloc(z, l);

            // An alignment larger than a page goes to the system allocator and is honoured.
            let l = Layout::from_size_align(LARGE, 2 * MAP_ALIGN).unwrap();
            let b = a.alloc(l);
            assert!(!b.is_null());
            assert_eq!(b as usize % (2 * MAP_ALIGN), 0);
            a.dealloc(b, l);
        }
    }

    /// No page of a large zeroed block is resident until written, and a written page is
    /// (asked of the kernel with `mincore`: exact, whatever other threads do meanwhile).
    #[test]
    fn large_zeroed_blocks_have_no_resident_page_until_written() {
        let resident = |p: *mut u8, len: usize| -> usize {
            let mut vec = vec![0u8; len.div_ceil(MAP_ALIGN)];
            // SAFETY: `p` is a page-aligned mapping of `len` bytes; `vec` has a byte a page.
            let r = unsafe { libc::mincore(p.cast(), len, vec.as_mut_ptr()) };
            assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
            vec.iter().filter(|&&b| b & 1 == 1).count()
        };
        let a = NodeAlloc;
        let l = Layout::from_size_align(65_536, 1).unwrap();
        // SAFETY: the blocks are used within their size and freed with their layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..64).map(|_| a.alloc_zeroed(l)).collect();
            for &b in &blocks {
                assert!(!b.is_null());
                assert_eq!(resident(b, 65_536), 0);
            }
            *blocks[0].add(5000) = 1;
            assert_eq!(resident(blocks[0], 65_536), 1);
            for b in blocks {
                a.dealloc(b, l);
            }
        }
    }
}
