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
//!
//! **Recycling.** Mapping and unmapping cost more than they seem on a node with several
//! workers: an unmap makes the kernel flush the other cores' TLBs (an interrupt to each, dear
//! in a VM), and every page of a fresh mapping faults on first touch. A connection that
//! opens, moves a few bytes and closes paid two maps and two unmaps — 46 % of the node's CPU
//! per connection in the connection-rate benchmark. So each worker (a thread that uses
//! [`recycling`]) keeps up to [`RECYCLE_BLOCKS`] of the blocks it freed, if at most
//! [`RECYCLE_MAX_RESIDENT`] of their pages are present and none is swapped out (read from
//! `/proc/self/pagemap`, which flushes nothing): it zeroes the present pages at once and hands
//! the block (the cleanest of the size first) to its next allocation of the same size made
//! inside [`recycling`] — a worker wraps its TUN input, where connections are accepted. When
//! its cache is full the oldest block is unmapped. Outside the scope nothing is taken: an idle
//! connection's compaction gets a fresh mapping with no page present. A connection accepted
//! with a recycled block starts with up to 4 zeroed pages per buffer present (16 KiB) until
//! it is compacted. Only with 4 KiB pages, the unit blocks are zeroed in
//! ([`enable_recycling`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

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

/// Freed blocks a thread keeps for reuse (see the module docs).
pub const RECYCLE_BLOCKS: usize = 16;
/// Resident pages a freed block may have and still be kept.
pub const RECYCLE_MAX_RESIDENT: usize = 4;
/// Largest block kept: 1 MiB (its page-table entries are read onto the stack).
const RECYCLE_MAX_PAGES: usize = 256;

/// `/proc/self/pagemap`, open while recycling is on (-1: off).
static PAGEMAP: AtomicI32 = AtomicI32::new(-1);
/// Blocks handed out again since start (for `/metrics`).
static RECYCLED: AtomicU64 = AtomicU64::new(0);

/// One kept block: address, mapped length, pages resident (zeroed) when it was kept.
#[derive(Clone, Copy)]
struct Kept {
    addr: usize,
    len: usize,
    resident: usize,
}

/// One thread's kept blocks, oldest first.
struct Recycled {
    blocks: [Kept; RECYCLE_BLOCKS],
    len: usize,
}

thread_local! {
    /// Inside [`recycling`]: allocations may take a recycled block.
    static TAKE: Cell<bool> = const { Cell::new(false) };
    /// The thread has used [`recycling`]: only such a thread keeps blocks (another would
    /// keep them for nothing).
    static RECYCLER: Cell<bool> = const { Cell::new(false) };
    static CACHE: RefCell<Recycled> = const {
        RefCell::new(Recycled {
            blocks: [Kept { addr: 0, len: 0, resident: 0 }; RECYCLE_BLOCKS],
            len: 0,
        })
    };
}

/// Turns recycling on where it is sound: 4 KiB pages (the unit the blocks are zeroed in) and
/// a readable `/proc/self/pagemap` (it tells a page never written from one swapped out,
/// which `mincore` cannot). Returns whether it is on. Call once at start.
pub fn enable_recycling() -> bool {
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != MAP_ALIGN as libc::c_long {
        return false;
    }
    if PAGEMAP.load(Ordering::Relaxed) >= 0 {
        return true;
    }
    // SAFETY: a NUL-terminated path; the descriptor is kept for the process's life.
    let fd = unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        PAGEMAP.store(fd, Ordering::Relaxed);
    }
    fd >= 0
}

/// Runs `f` with this thread's recycled blocks available to its allocations.
pub fn recycling<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag however `f` ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0;
            let _ = TAKE.try_with(|t| t.set(before));
        }
    }
    RECYCLER.with(|r| r.set(true));
    let _restore = Restore(TAKE.with(|t| t.replace(true)));
    f()
}

/// Blocks handed out again since start.
pub fn recycled() -> u64 {
    RECYCLED.load(Ordering::Relaxed)
}

/// A recycled block of `len` mapped bytes for this thread, if inside [`recycling`] and one
/// is kept: of those, the one with the fewest resident pages. It reads as zeroes.
fn take_recycled(len: usize) -> Option<*mut u8> {
    if !TAKE.try_with(Cell::get).unwrap_or(false) {
        return None;
    }
    CACHE
        .try_with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            let n = c.len;
            let (i, k) = c.blocks[..n]
                .iter()
                .enumerate()
                .filter(|(_, k)| k.len == len)
                .min_by_key(|(_, k)| k.resident)
                .map(|(i, k)| (i, *k))?;
            c.blocks.copy_within(i + 1..n, i);
            c.len = n - 1;
            RECYCLED.fetch_add(1, Ordering::Relaxed);
            Some(k.addr as *mut u8)
        })
        .ok()
        .flatten()
}

/// How many of the `pages` pages at `p` are present (their indices set in `present`), or
/// `None` if one is swapped out or the page table cannot be read.
fn present_pages(
    p: *mut u8,
    pages: usize,
    present: &mut [bool; RECYCLE_MAX_PAGES],
) -> Option<usize> {
    let fd = PAGEMAP.load(Ordering::Relaxed);
    let mut entries = [0u64; RECYCLE_MAX_PAGES];
    let bytes = pages * 8;
    let offset = (p as usize / MAP_ALIGN * 8) as libc::off_t;
    // SAFETY: `entries` has room for `bytes` (pages ≤ RECYCLE_MAX_PAGES).
    let n = unsafe { libc::pread(fd, entries.as_mut_ptr().cast(), bytes, offset) };
    if n != bytes as isize {
        return None;
    }
    let mut count = 0;
    for (i, e) in entries[..pages].iter().enumerate() {
        // Bit 63: present in RAM; bit 62: swapped out (its old bytes come back on a read).
        if e & (1 << 62) != 0 {
            return None;
        }
        present[i] = e & (1 << 63) != 0;
        count += usize::from(present[i]);
    }
    Some(count)
}

/// Keeps the freed mapping `p` of `len` bytes for reuse if recycling is on, this thread
/// recycles and few of its pages are present (zeroing those); when the thread's cache is
/// full, its oldest block goes back to the kernel instead. False if the caller must unmap
/// `p` itself.
fn keep_recycled(p: *mut u8, len: usize) -> bool {
    let pages = len / MAP_ALIGN;
    if PAGEMAP.load(Ordering::Relaxed) < 0
        || pages > RECYCLE_MAX_PAGES
        || !RECYCLER.try_with(Cell::get).unwrap_or(false)
    {
        return false;
    }
    CACHE
        .try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else {
                return false;
            };
            let mut present = [false; RECYCLE_MAX_PAGES];
            let resident = match present_pages(p, pages, &mut present) {
                Some(n) if n <= RECYCLE_MAX_RESIDENT => n,
                _ => return false,
            };
            for i in (0..pages).filter(|&i| present[i]) {
                // SAFETY: page `i` lies inside the block, which the caller gave up.
                unsafe { ptr::write_bytes(p.add(i * MAP_ALIGN), 0, MAP_ALIGN) };
            }
            if c.len == RECYCLE_BLOCKS {
                let oldest = c.blocks[0];
                c.blocks.copy_within(1.., 0);
                c.len -= 1;
                // SAFETY: a kept block is a mapping of `oldest.len` bytes made by `map`, and
                // nothing else refers to it.
                if unsafe { libc::munmap(oldest.addr as *mut libc::c_void, oldest.len) } != 0 {
                    UNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
                }
            }
            let n = c.len;
            c.blocks[n] = Kept {
                addr: p as usize,
                len,
                resident,
            };
            c.len = n + 1;
            true
        })
        .unwrap_or(false)
}

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
            take_recycled(pages(layout.size())).unwrap_or_else(|| map(layout.size()))
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // A fresh anonymous mapping reads as zeroes and none of its pages is resident;
            // a recycled one was zeroed when it was kept.
            take_recycled(pages(layout.size())).unwrap_or_else(|| map(layout.size()))
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if mapped(&layout) {
            if keep_recycled(p, pages(layout.size())) {
                return;
            }
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

    /// Inside `recycling`, a block freed with few resident pages is handed to the next
    /// allocation of its size, zeroed (the one with the fewest resident pages first);
    /// outside it, or dirtier, it is not; a full cache gives its oldest block back.
    #[test]
    fn freed_blocks_are_recycled_zeroed_only_inside_the_scope_and_only_when_nearly_clean() {
        assert!(
            enable_recycling(),
            "4 KiB pages and /proc/self/pagemap are what the project's machines have"
        );
        let a = NodeAlloc;
        let l = Layout::from_size_align(262_144, 1).unwrap();
        // A thread that never recycles keeps nothing.
        // SAFETY: the block is used within its size and freed with its layout.
        let kept_by_others = std::thread::spawn(move || unsafe {
            let p = NodeAlloc.alloc_zeroed(l);
            NodeAlloc.dealloc(p, l);
            CACHE.with(|c| c.borrow().len)
        });
        assert_eq!(kept_by_others.join().unwrap(), 0);
        // This thread is a worker from here on.
        recycling(|| ());
        let write = |p: *mut u8, pages: &[usize]| {
            for &page in pages {
                // SAFETY: the test owns the block and `page` lies inside it.
                unsafe { ptr::write_bytes(p.add(page * MAP_ALIGN + 100), 0xab, 50) };
            }
        };
        // SAFETY: the blocks are used within their size and freed with their layout.
        unsafe {
            // Two blocks kept, three pages and one page written.
            let (p3, p1) = (a.alloc_zeroed(l), a.alloc_zeroed(l));
            write(p3, &[0, 7, 63]);
            write(p1, &[5]);
            a.dealloc(p3, l);
            a.dealloc(p1, l);
            // Outside the scope: a fresh mapping (the kept blocks stay kept).
            let fresh = a.alloc_zeroed(l);
            assert!(fresh != p3 && fresh != p1);
            // Inside: the cleaner one first, then the other; both read as zeroes.
            let before = recycled();
            let q1 = recycling(|| a.alloc_zeroed(l));
            let q3 = recycling(|| a.alloc(l));
            assert_eq!((q1, q3), (p1, p3), "kept blocks, the cleaner first");
            assert_eq!(recycled(), before + 2);
            for (q, pages) in [(q1, [5].as_slice()), (q3, [0, 7, 63].as_slice())] {
                for &page in pages {
                    let at = page * MAP_ALIGN;
                    assert!((at..at + MAP_ALIGN).all(|i| *q.add(i) == 0), "page {page}");
                }
            }
            // A taken block grows like any other (mremap), keeping its bytes.
            write(q1, &[5]);
            let grown = a.realloc(q1, l, 2 * 262_144);
            assert_eq!(*grown.add(5 * MAP_ALIGN + 100), 0xab);
            a.dealloc(grown, Layout::from_size_align(2 * 262_144, 1).unwrap());
            // Another size does not take a kept one.
            a.dealloc(q3, l);
            let other = Layout::from_size_align(131_072, 1).unwrap();
            let r = recycling(|| a.alloc_zeroed(other));
            assert_ne!(r, p3);
            a.dealloc(r, other);
            // A block with more than RECYCLE_MAX_RESIDENT pages written goes back.
            let again = recycling(|| a.alloc_zeroed(l));
            assert_eq!(again, p3);
            write(again, &(0..=RECYCLE_MAX_RESIDENT).collect::<Vec<_>>());
            a.dealloc(again, l);
            // (The kernel may map the next block at the freed address: count, not compare.)
            let before = recycled();
            let next = recycling(|| a.alloc_zeroed(l));
            assert_eq!(recycled(), before, "a dirty block was kept");
            // Every byte of a fresh block reads as zero.
            assert!((0..262_144).all(|i| *next.add(i) == 0));
            a.dealloc(next, l);
            a.dealloc(fresh, l);
            // A full cache gives back its oldest block for a new one: after 16 blocks of
            // another size, the 256 KiB one kept last is still there to take.
            let small = Layout::from_size_align(65_536, 1).unwrap();
            let smalls: Vec<*mut u8> = (0..RECYCLE_BLOCKS).map(|_| a.alloc_zeroed(small)).collect();
            let last = a.alloc_zeroed(l);
            for b in smalls {
                a.dealloc(b, small);
            }
            a.dealloc(last, l);
            assert_eq!(CACHE.with(|c| c.borrow().len), RECYCLE_BLOCKS);
            assert_eq!(recycling(|| a.alloc_zeroed(l)), last);
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
