//! Which pages of a memory range were written since last asked, told by the kernel rather
//! than found by comparing: userfaultfd write-protection in its asynchronous mode (Linux 6.7)
//! marks the pages, and the `PAGEMAP_SCAN` ioctl reads the written ones and protects them
//! again in one call. The cost of asking is the page-table walk of the range plus a record
//! per run of written pages: it follows what was written, not what the range holds.
//!
//! In the asynchronous mode no thread serves faults: the kernel lifts the protection of a page
//! at its first write and notes it, at the cost of a minor fault. A private file mapping (a
//! module's copy-on-write image) counts only the pages copied out of the file, so a page that
//! was only read is never reported.
//!
//! Where the kernel refuses (older than 6.7, `userfaultfd` blocked by seccomp, gVisor),
//! [`Tracker::open`] says why and the caller keeps its own way of finding written pages.
//!
//! The crate's `unsafe` is the ioctls and the `userfaultfd` call, each with its reason.
#![deny(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use linux_raw_sys::general as sys;
use linux_raw_sys::ioctl as nr;
use rustix::ioctl::{Updater, ioctl, opcode};

/// One process's write tracker: a userfaultfd in asynchronous write-protect mode and
/// `/proc/self/pagemap` to scan with. Ranges are tracked with [`Tracker::track`].
#[derive(Debug)]
pub struct Tracker {
    uffd: OwnedFd,
    pagemap: File,
}

/// Runs of written pages read per `PAGEMAP_SCAN` call; a range with more is read in turns.
const REGIONS: usize = 256;

/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (rather than lift protection from) the range.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// `PAGEMAP_SCAN`, `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: rustix::ioctl::Opcode = opcode::read_write::<sys::pm_scan_arg>(b'f', 16);

impl Tracker {
    /// The process's tracker, opened on first use; the error says why the kernel refuses one.
    pub fn get() -> Result<&'static Tracker, &'static str> {
        static TRACKER: OnceLock<Result<Tracker, String>> = OnceLock::new();
        TRACKER
            .get_or_init(|| Tracker::open().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(String::as_str)
    }

    /// A new tracker, or the kernel's reason for refusing one.
    pub fn open() -> io::Result<Tracker> {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC
            | rustix::mm::UserfaultfdFlags::NONBLOCK
            // Faults from user mode only: what an unprivileged process may ask for
            // (`vm.unprivileged_userfaultfd = 0`). Asynchronous write faults are resolved in the
            // kernel whichever mode they come from.
            | rustix::mm::UserfaultfdFlags::from_bits_retain(sys::UFFD_USER_MODE_ONLY);
        // SAFETY: the descriptor can only change how faults in ranges registered on it are
        // handled; this crate registers ranges only in write-protect mode with asynchronous
        // resolution, where a fault never waits for a handler.
        #[allow(unsafe_code, reason = "the userfaultfd system call")]
        let uffd = unsafe { rustix::mm::userfaultfd(flags) }.map_err(io::Error::from)?;
        let mut api = sys::uffdio_api {
            api: u64::from(sys::UFFD_API),
            features: u64::from(sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
            ioctls: 0,
        };
        // SAFETY: `UFFDIO_API` reads and writes a `uffdio_api`, which `api` is.
        #[allow(unsafe_code, reason = "an ioctl on the userfaultfd")]
        unsafe { ioctl(&uffd, Updater::<{ nr::UFFDIO_API }, _>::new(&mut api)) }.map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                "the kernel has no asynchronous userfaultfd write-protection (Linux 6.7+)",
            )
        })?;
        let pagemap = File::open("/proc/self/pagemap")?;
        let tracker = Tracker { uffd, pagemap };
        tracker.probe()?;
        Ok(tracker)
    }

    /// Tracks a small range of its own once: a kernel that takes the handshake but not the
    /// scan (or scans wrong) is found here, not in a session's first turn.
    fn probe(&self) -> io::Result<()> {
        let page = rustix::param::page_size();
        let mut memory = vec![0u8; page * 8];
        let start = memory.as_mut_ptr() as usize;
        // The vector is not page aligned: track its whole pages only.
        let first = start.next_multiple_of(page);
        let tracked = self.track(first, page * 4)?;
        let mut written = Vec::new();
        tracked.take_written(&mut written)?; // arms every page
        let at = first - start;
        memory[at + page * 2] = 1;
        std::hint::black_box(&memory);
        tracked.take_written(&mut written)?;
        if written != [2] {
            return Err(io::Error::other(format!(
                "a probe wrote page 2 and the kernel reported {written:?}"
            )));
        }
        drop(tracked);
        drop(memory);
        Ok(())
    }

    /// Starts tracking the `len` bytes at `start` (both page aligned): every page counts as
    /// written until the first [`Tracked::take_written`]. Stops when the guard is dropped,
    /// which must be before the range is unmapped or reused.
    pub fn track(&self, start: usize, len: usize) -> io::Result<Tracked<'_>> {
        self.register(start, len)?;
        Ok(Tracked {
            tracker: self,
            start,
            len,
        })
    }

    fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut register = sys::uffdio_register {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: u64::from(sys::UFFDIO_REGISTER_MODE_WP),
            ioctls: 0,
        };
        // SAFETY: `UFFDIO_REGISTER` reads and writes a `uffdio_register`, which `register` is.
        // Registering write-protect mode with asynchronous resolution changes no fault's
        // outcome, only whether the kernel notes the write.
        #[allow(unsafe_code, reason = "an ioctl on the userfaultfd")]
        unsafe {
            ioctl(
                &self.uffd,
                Updater::<{ nr::UFFDIO_REGISTER }, _>::new(&mut register),
            )
        }?;
        Ok(())
    }

    /// Protects `len` bytes at `start` again: their next write is noted.
    fn protect(&self, start: usize, len: usize) -> io::Result<()> {
        let mut protect = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: `UFFDIO_WRITEPROTECT` reads a `uffdio_writeprotect`, which `protect` is.
        // Protecting a registered range in asynchronous mode makes its next writes fault and be
        // noted by the kernel; none waits for a handler.
        #[allow(unsafe_code, reason = "an ioctl on the userfaultfd")]
        unsafe {
            ioctl(
                &self.uffd,
                Updater::<{ nr::UFFDIO_WRITEPROTECT }, _>::new(&mut protect),
            )
        }?;
        Ok(())
    }

    fn untrack(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: `UFFDIO_UNREGISTER` reads a `uffdio_range`, which `range` is.
        #[allow(unsafe_code, reason = "an ioctl on the userfaultfd")]
        unsafe {
            ioctl(
                &self.uffd,
                Updater::<{ nr::UFFDIO_UNREGISTER }, _>::new(&mut range),
            )
        }?;
        Ok(())
    }

    /// Appends to `pages` the pages of `[start, end)` written since they were last protected
    /// (numbered from `base`); with `protect`, protects them again.
    fn scan(
        &self,
        base: usize,
        (start, end): (usize, usize),
        protect: bool,
        pages: &mut Vec<u32>,
    ) -> io::Result<()> {
        let page = rustix::param::page_size() as u64;
        let none = sys::page_region {
            start: 0,
            end: 0,
            categories: 0,
        };
        let mut regions = [none; REGIONS];
        let (mut at, end) = (start as u64, end as u64);
        while at < end {
            // The kernel fills regions from the first; those left as they were were not used.
            regions.fill(none);
            // Written, and not a page of a file or the shared zero page: a page only read is
            // mapped from its file (or the zero page) and was never copied. And present (or
            // swapped out): the kernel counts a range with no page table yet as written, and
            // protecting it would fill its page tables with markers.
            let not = u64::from(sys::PAGE_IS_FILE | sys::PAGE_IS_PFNZERO);
            let mut arg = sys::pm_scan_arg {
                size: std::mem::size_of::<sys::pm_scan_arg>() as u64,
                flags: u64::from(sys::PM_SCAN_CHECK_WPASYNC)
                    | if protect {
                        u64::from(sys::PM_SCAN_WP_MATCHING)
                    } else {
                        0
                    },
                start: at,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: REGIONS as u64,
                max_pages: 0,
                category_inverted: not,
                category_mask: u64::from(sys::PAGE_IS_WRITTEN) | not,
                category_anyof_mask: u64::from(sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED),
                return_mask: u64::from(sys::PAGE_IS_WRITTEN),
            };
            // SAFETY: `PAGEMAP_SCAN` reads and writes a `pm_scan_arg` and writes at most
            // `vec_len` `page_region`s at `vec`, which `regions` holds. Its write-protecting
            // touches only ranges registered on this process's userfaultfd in asynchronous
            // mode (it fails otherwise: `PM_SCAN_CHECK_WPASYNC`).
            #[allow(unsafe_code, reason = "the PAGEMAP_SCAN ioctl")]
            let found = unsafe {
                ioctl(
                    self.pagemap.as_fd(),
                    Updater::<PAGEMAP_SCAN, _>::new(&mut arg),
                )
            };
            found.map_err(io::Error::from)?;
            if arg.walk_end <= at || arg.walk_end > end {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN of {at:#x}..{end:#x} stopped at {:#x}",
                    arg.walk_end
                )));
            }
            for region in regions.iter().take_while(|r| r.end != 0) {
                let first = (region.start - base as u64) / page;
                let last = (region.end - base as u64) / page;
                pages.extend(first as u32..last as u32);
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// A tracked range: pages written in it are noted by the kernel until this is dropped.
#[derive(Debug)]
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    start: usize,
    len: usize,
}

impl Tracked<'_> {
    /// The pages of the range written since they were last protected (or since tracking
    /// began), ascending, numbered from the range's start. A page stays in the list until it
    /// is protected: a caller may leave the pages it expects written again unprotected, and
    /// save their write faults for a comparison of its own.
    pub fn written(&self, pages: &mut Vec<u32>) -> io::Result<()> {
        pages.clear();
        let range = (self.start, self.start + self.len);
        self.tracker.scan(self.start, range, false, pages)
    }

    /// Protects `pages` (ascending, numbered from the range's start): each is listed by
    /// [`written`](Self::written) again only once it is written again. One call per run of
    /// consecutive pages.
    pub fn protect(&self, pages: &[u32]) -> io::Result<()> {
        let page = rustix::param::page_size();
        let mut runs = pages.iter().peekable();
        while let Some(&first) = runs.next() {
            let mut last = first;
            while let Some(&&next) = runs.peek().filter(|&&&n| n == last + 1) {
                last = next;
                runs.next();
            }
            let count = (last - first + 1) as usize;
            self.tracker
                .protect(self.start + first as usize * page, count * page)?;
        }
        Ok(())
    }

    /// The pages written since the last call, or since tracking began, and protects them all
    /// again in the same walk: [`written`](Self::written) and [`protect`](Self::protect) at once.
    pub fn take_written(&self, pages: &mut Vec<u32>) -> io::Result<()> {
        pages.clear();
        let range = (self.start, self.start + self.len);
        self.tracker.scan(self.start, range, true, pages)
    }

    /// Tracks the range on to `len` bytes (a memory that grew): the new pages count as written
    /// until protected.
    pub fn grow_to(&mut self, len: usize) -> io::Result<()> {
        if len > self.len {
            self.tracker
                .register(self.start + self.len, len - self.len)?;
            self.len = len;
        }
        Ok(())
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        // Fails only for a range no longer mapped, whose registration went with it.
        let _ = self.tracker.untrack(self.start, self.len);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn written_pages_are_reported_once() {
        // ARL's tests run on Linux 6.7 or later, with `userfaultfd` allowed.
        let tracker = Tracker::get().unwrap();
        let page = rustix::param::page_size();
        let mut memory = vec![0u8; page * 65];
        let base = memory.as_mut_ptr() as usize;
        let first = base.next_multiple_of(page);
        let at = first - base;
        let mut tracked = tracker.track(first, page * 10).unwrap();
        let mut pages = Vec::new();
        tracked.take_written(&mut pages).unwrap();
        assert!(pages.len() <= 10, "only pages already present: {pages:?}");
        tracked.take_written(&mut pages).unwrap();
        assert_eq!(pages, [] as [u32; 0], "nothing written since");
        for i in [3, 4, 40] {
            memory[at + i * page + 7] = 9;
        }
        tracked.take_written(&mut pages).unwrap();
        assert_eq!(pages, [3, 4], "page 40 is past the tracked part");
        memory[at + 4 * page] = 1;
        tracked.grow_to(page * 64).unwrap();
        tracked.take_written(&mut pages).unwrap();
        assert!(
            pages.contains(&4) && pages.contains(&40) && !pages.contains(&3),
            "{pages:?}"
        );
        tracked.take_written(&mut pages).unwrap();
        assert_eq!(pages, [] as [u32; 0]);

        // Listed until protected; protected pages come back once written.
        for i in [5, 6, 7, 9] {
            memory[at + i * page] = 2;
        }
        tracked.written(&mut pages).unwrap();
        assert_eq!(pages, [5, 6, 7, 9]);
        tracked.written(&mut pages).unwrap();
        assert_eq!(pages, [5, 6, 7, 9], "still unprotected");
        tracked.protect(&[5, 6, 9]).unwrap();
        tracked.written(&mut pages).unwrap();
        assert_eq!(pages, [7]);
        memory[at + 6 * page] = 3;
        tracked.written(&mut pages).unwrap();
        assert_eq!(pages, [6, 7]);
    }
}

#[cfg(test)]
mod mappings {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};

    /// A linear memory as wasmtime maps one: a module's image mapped private from its file,
    /// and anonymous memory after it. Pages only read are never reported, pages written are,
    /// and so after the memory is given back (`MADV_DONTNEED`, a pooled slot's reset).
    #[test]
    #[allow(unsafe_code, reason = "mapping memory to track, unmapped at the end")]
    fn only_pages_written_count_in_file_and_anonymous_mappings() {
        let tracker = Tracker::get().unwrap();
        let page = rustix::param::page_size();
        let n = 1024;
        let file = tempfile_of(n * page);
        // SAFETY: new mappings, used only through the raw pointers below, unmapped at the end.
        let image = unsafe {
            mmap(
                std::ptr::null_mut(),
                n * page,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
                &file,
                0,
            )
        }
        .unwrap();
        // SAFETY: as above.
        let anonymous = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                n * page,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .unwrap();
        for at in [image.cast::<u8>(), anonymous.cast::<u8>()] {
            for _ in 0..2 {
                let tracked = tracker.track(at as usize, n * page).unwrap();
                let mut pages = Vec::new();
                tracked.take_written(&mut pages).unwrap();
                assert_eq!(pages.len(), 0, "nothing present yet");
                let read: u64 = (0..n)
                    // SAFETY: within the mapping.
                    .map(|i| u64::from(unsafe { std::ptr::read_volatile(at.add(i * page)) }))
                    .sum();
                tracked.take_written(&mut pages).unwrap();
                assert_eq!(pages.len(), 0, "only read ({read})");
                for i in (0..30).step_by(3) {
                    // SAFETY: within the mapping.
                    unsafe { std::ptr::write_volatile(at.add(i * page + 1), 1) };
                }
                tracked.take_written(&mut pages).unwrap();
                assert_eq!(pages, (0..30).step_by(3).collect::<Vec<u32>>());
                drop(tracked);
                // SAFETY: the mapping's own pages, given back as a pooled slot's are.
                unsafe {
                    rustix::mm::madvise(at.cast(), n * page, rustix::mm::Advice::LinuxDontNeed)
                }
                .unwrap();
            }
        }
        // SAFETY: the two mappings made above, no longer used.
        unsafe {
            munmap(image, n * page).unwrap();
            munmap(anonymous, n * page).unwrap();
        }
    }

    fn tempfile_of(len: usize) -> File {
        let path = std::env::temp_dir().join(format!("arl-writes-{}.bin", std::process::id()));
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
