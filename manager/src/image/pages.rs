//! The pages a guest wrote, found through `/proc/self/pagemap` and copied out: what a
//! capture, a checkpoint and a restore move.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};

/// The host's page size, the unit of capture.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Captures that fell back to copying a whole memory (see [`whole_memory_captures`]).
static WHOLE_MEMORY: AtomicU64 = AtomicU64::new(0);

/// How many captures copied a whole memory because `/proc/self/pagemap` could not say which
/// pages were written (the metric `arl_whole_memory_captures_total`).
pub fn whole_memory_captures() -> u64 {
    WHOLE_MEMORY.load(Ordering::Relaxed)
}

/// Counts a capture that copies the whole memory, and says so at `error` the first time:
/// forks, snapshots and rollbacks then cost far more than they should.
fn whole_memory(why: &dyn std::fmt::Display) {
    static SAID: Once = Once::new();
    WHOLE_MEMORY.fetch_add(1, Ordering::Relaxed);
    SAID.call_once(|| {
        tracing::error!(
            error = %why,
            "cannot read /proc/self/pagemap: captures copy whole memories (counted in \
             arl_whole_memory_captures_total)"
        );
    });
}

/// `/proc/self/pagemap`, opened once; `None` where the kernel does not offer it (gVisor,
/// some hardened kernels), and then every page counts as written.
fn pagemap() -> Option<&'static File> {
    static PAGEMAP: OnceLock<Result<File, String>> = OnceLock::new();
    match PAGEMAP.get_or_init(|| File::open("/proc/self/pagemap").map_err(|e| e.to_string())) {
        Ok(file) => Some(file),
        Err(e) => {
            whole_memory(e);
            None
        }
    }
}

/// The host pages of `memory` that the guest wrote since it was instantiated, ascending.
/// A page not listed still holds the module's image (or zeros past it).
pub fn written_pages(memory: &[u8]) -> Vec<u32> {
    let page = page_size();
    let count = memory.len() / page;
    let all = || (0..count as u32).collect();
    let Some(pagemap) = pagemap() else {
        return all();
    };
    let start = memory.as_ptr() as usize;
    let mut entries = vec![0u8; count * 8];
    if let Err(e) = pagemap.read_exact_at(&mut entries, (start / page) as u64 * 8) {
        whole_memory(&e);
        return all();
    }
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    entries
        .chunks_exact(8)
        .enumerate()
        .filter_map(|(i, e)| {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let private = e & (PRESENT | SWAPPED) != 0 && e & FILE_OR_SHARED == 0;
            private.then_some(i as u32)
        })
        .collect()
}

/// Copies of some host pages of a linear memory: their numbers (ascending) and, for each,
/// where its bytes are in `data` (pages added later go at its end, so that keeping a
/// checkpoint up to date never moves or re-faults what it holds already).
#[derive(Debug, Default)]
pub struct Pages {
    index: Vec<u32>,
    slots: Vec<u32>,
    data: Vec<u8>,
}

impl Clone for Pages {
    fn clone(&self) -> Self {
        let mut data = bytes_with_room(self.data.len());
        data.extend_from_slice(&self.data);
        Self {
            index: self.index.clone(),
            slots: self.slots.clone(),
            data,
        }
    }
}

impl PartialEq for Pages {
    /// The same pages with the same bytes, wherever they sit in `data`.
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Eq for Pages {}

impl Pages {
    /// Pages `index` (ascending), their bytes one after another in `data`.
    pub(crate) fn from_parts(index: Vec<u32>, data: Vec<u8>) -> Self {
        Self {
            slots: (0..index.len() as u32).collect(),
            index,
            data,
        }
    }

    /// The numbers of the pages it holds, ascending.
    pub fn numbers(&self) -> &[u32] {
        &self.index
    }

    /// How many pages it holds.
    pub fn count(&self) -> usize {
        self.index.len()
    }

    /// The pages of `memory` the guest wrote.
    pub fn capture(memory: &[u8]) -> Self {
        let index = written_pages(memory);
        let mut data = bytes_with_room(index.len() * page_size());
        for &i in &index {
            data.extend_from_slice(page_of(memory, i));
        }
        let slots = (0..index.len() as u32).collect();
        Self { index, slots, data }
    }

    /// Each page's number and bytes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> {
        (0..self.index.len()).map(|n| (self.index[n], self.slot(n)))
    }

    /// Writes the pages into `memory`, which holds the module's image elsewhere.
    pub fn restore(&self, memory: &mut [u8]) {
        let page = page_size();
        for (i, bytes) in self.iter() {
            let at = i as usize * page;
            memory[at..at + page].copy_from_slice(bytes);
        }
    }

    /// Brings the copies in `pages` up to date with `memory`, which has only grown and been
    /// written since: pages that changed are copied again, pages written for the first time
    /// added. Copies shared with a capture still in use are left to it (copy on write).
    ///
    /// Finds what changed by reading the page map and comparing every copy with its page:
    /// its cost follows what the memory holds. [`Pages::sync_written`] is the cheap way, when
    /// the kernel says which pages were written.
    pub fn sync(pages: &mut Arc<Pages>, memory: &[u8]) {
        let written = written_pages(memory);
        let changed: Vec<usize> = (0..pages.index.len())
            .filter(|&n| pages.slot(n) != page_of(memory, pages.index[n]))
            .collect();
        let added = pages.unknown(written);
        Self::apply(pages, memory, changed, added);
    }

    /// [`Pages::sync`] when `listed` (ascending) holds every page written since the copies
    /// were last brought up to date, and perhaps some that were not: only those are compared
    /// and copied. Answers the listed pages found unchanged (ascending).
    pub fn sync_listed(pages: &mut Arc<Pages>, memory: &[u8], listed: &[u32]) -> Vec<u32> {
        let (mut changed, mut added, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
        let mut known = pages.index.iter().enumerate().peekable();
        for &i in listed {
            while known.next_if(|(_, k)| **k < i).is_some() {}
            match known.peek() {
                Some(&(n, k)) if *k == i && pages.slot(n) == page_of(memory, i) => {
                    unchanged.push(i);
                }
                Some(&(n, k)) if *k == i => changed.push(n),
                _ => added.push(i),
            }
        }
        Self::apply(pages, memory, changed, added);
        unchanged
    }

    /// The pages of `written` (ascending) not held yet.
    fn unknown(&self, written: Vec<u32>) -> Vec<u32> {
        let mut known = self.index.iter().peekable();
        written
            .into_iter()
            .filter(|i| {
                while known.next_if(|k| *k < i).is_some() {}
                known.peek() != Some(&i)
            })
            .collect()
    }

    /// Copies again the held pages `changed` (positions in the index) and adds the pages
    /// `added` (numbers, ascending, none held yet) from `memory`.
    fn apply(pages: &mut Arc<Pages>, memory: &[u8], changed: Vec<usize>, added: Vec<u32>) {
        if changed.is_empty() && added.is_empty() {
            return;
        }
        let pages = Arc::make_mut(pages);
        let page = page_size();
        for n in changed {
            let at = pages.slots[n] as usize * page;
            pages.data[at..at + page].copy_from_slice(page_of(memory, pages.index[n]));
        }
        if added.is_empty() {
            return;
        }
        let first_slot = pages.index.len() as u32;
        let needed = pages.data.len() + added.len() * page;
        if pages.data.capacity() < needed.max(OWN_MAPPING) {
            let mut grown = bytes_with_room(needed);
            grown.extend_from_slice(&pages.data);
            pages.data = grown;
        }
        for &i in &added {
            pages.data.extend_from_slice(page_of(memory, i));
        }
        // Merge the new pages into the ascending index.
        let old = std::mem::take(&mut pages.index)
            .into_iter()
            .zip(std::mem::take(&mut pages.slots));
        let mut merged: Vec<(u32, u32)> = old.chain(added.into_iter().zip(first_slot..)).collect();
        merged.sort_unstable_by_key(|&(i, _)| i);
        (pages.index, pages.slots) = merged.into_iter().unzip();
    }

    fn slot(&self, n: usize) -> &[u8] {
        let page = page_size();
        let at = self.slots[n] as usize * page;
        &self.data[at..at + page]
    }
}

/// The least a copy of pages reserves (address space, not memory): above the largest size
/// glibc's malloc serves from its heaps (32 MiB), so that each copy is a mapping of its own,
/// given back to the kernel whole when it is dropped. Served from a heap, the copies an idle
/// session lets go of would stay resident in it.
const OWN_MAPPING: usize = 33 << 20;

/// An empty buffer for at least `len` bytes, in a mapping of its own (see [`OWN_MAPPING`]).
fn bytes_with_room(len: usize) -> Vec<u8> {
    Vec::with_capacity(len.max(OWN_MAPPING))
}

fn page_of(memory: &[u8], i: u32) -> &[u8] {
    let page = page_size();
    let at = i as usize * page;
    &memory[at..at + page]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn only_the_pages_written_are_found_and_captured() {
        // A linear memory as wasmtime maps it: page-aligned, no page present until written.
        let mut store = wasmtime::Store::new(&wasmtime::Engine::default(), ());
        let memory = wasmtime::Memory::new(&mut store, wasmtime::MemoryType::new(4, None)).unwrap();
        let page = page_size();
        let data = memory.data_mut(&mut store);
        data[page * 3] = 7;
        data[page * 40 + 5] = 9;
        assert_eq!(written_pages(data), [3, 40]);
        assert_eq!(Pages::capture(data).numbers(), [3, 40]);
        assert_eq!(whole_memory_captures(), 0, "pagemap was read, not guessed");
    }

    #[test]
    fn written_pages_are_the_ones_touched() {
        let page = page_size();
        let mut memory = vec![0u8; page * 64];
        memory[page * 3] = 7;
        memory[page * 40 + 5] = 9;
        let pages = Pages::capture(&memory);
        let mut fresh = vec![0u8; page * 64];
        pages.restore(&mut fresh);
        assert_eq!(fresh, memory);
    }

    #[test]
    fn a_sync_takes_the_pages_written_since() {
        let page = page_size();
        let mut memory = vec![1u8; page * 8];
        let mut pages = Arc::new(Pages::capture(&memory));
        memory[page * 2] = 5;
        let shared = pages.clone();
        Pages::sync(&mut pages, &memory);
        assert!(
            !Arc::ptr_eq(&pages, &shared),
            "a shared copy is left as it was"
        );
        let mut copy = vec![1u8; page * 8];
        pages.restore(&mut copy);
        assert_eq!(copy, memory);
        let mut old = vec![1u8; page * 8];
        shared.restore(&mut old);
        assert_eq!(old[page * 2], 1);
    }

    #[test]
    fn a_sync_of_the_pages_listed_copies_only_those_that_changed() {
        let page = page_size();
        let mut memory = vec![0u8; page * 8];
        memory[page] = 1;
        memory[page * 5] = 5;
        let held = [page_of(&memory, 1), page_of(&memory, 5)].concat();
        let mut pages = Arc::new(Pages::from_parts(vec![1, 5], held));
        memory[page * 5] = 6; // held, changed
        memory[page * 3] = 3; // new
        memory[page] = 2; // changed, and listed
        let unchanged = Pages::sync_listed(&mut pages, &memory, &[1, 3, 5]);
        assert_eq!(unchanged, [] as [u32; 0]);
        assert_eq!(pages.numbers(), [1, 3, 5]);
        let mut back = vec![0u8; page * 8];
        pages.restore(&mut back);
        assert_eq!((back[page], back[page * 3], back[page * 5]), (2, 3, 6));
        memory[page * 5] = 7;
        let unchanged = Pages::sync_listed(&mut pages, &memory, &[1, 3, 5]);
        assert_eq!(unchanged, [1, 3], "listed but not written since");
        pages.restore(&mut back);
        assert_eq!(back, memory);
    }

    #[test]
    fn pages_written_later_are_merged_in_order() {
        let page = page_size();
        let mut pages = Arc::new(Pages {
            index: vec![1, 5],
            slots: vec![0, 1],
            data: vec![7u8; page * 2],
        });
        let mut memory = vec![0u8; page * 8];
        memory[page..page * 2].fill(7);
        memory[page * 5..page * 6].fill(7);
        memory[page * 3] = 9; // written for the first time
        Pages::sync(&mut pages, &memory);
        let mut back = vec![0u8; page * 8];
        pages.restore(&mut back);
        assert_eq!(back, memory);
        assert!(
            pages.index.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            pages.index
        );
    }
}
