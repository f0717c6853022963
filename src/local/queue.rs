//! The queue of builds waiting for a slot: a FIFO that grows a chunk at a time.
//!
//! A `VecDeque` doubles: at 262,144 queued builds of 40 bytes, its next push copies 10 MiB
//! into a new 20 MiB buffer, and a burst's memory peak is that moment. Here memory follows
//! the queue's length (one 40 KiB chunk more at a time) and nothing is ever copied whole.

use std::collections::VecDeque;

/// Entries per chunk.
const CHUNK: usize = 1024;

pub struct ChunkedQueue<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> ChunkedQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    /// Keeps the entries for which `keep` is true, in order. Chunks left empty are freed;
    /// ones left part-full stay so (a stop is rare, and they drain from the front).
    pub fn retain_mut(&mut self, mut keep: impl FnMut(&mut T) -> bool) {
        for chunk in &mut self.chunks {
            chunk.retain_mut(&mut keep);
        }
        self.chunks.retain(|c| !c.is_empty());
        self.len = self.chunks.iter().map(VecDeque::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_a_fifo_across_chunks_and_retain_keeps_the_order() {
        let mut q = ChunkedQueue::default();
        let n = 3 * CHUNK + 7;
        for i in 0..n {
            q.push_back(i);
        }
        assert_eq!(q.len(), n);
        assert_eq!(q.chunks.len(), 4);
        // Drop a whole chunk's worth and every other one before it.
        q.retain_mut(|i| !(*i >= CHUNK && *i < 2 * CHUNK) && (*i >= CHUNK || *i % 2 == 0));
        assert_eq!(q.len(), n - CHUNK - CHUNK / 2);
        assert_eq!(q.chunks.len(), 3, "the emptied chunk is freed");
        let want: Vec<usize> = (0..CHUNK).step_by(2).chain(2 * CHUNK..n).collect();
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), want);
        // Pushes after a retain go behind the rest.
        q.push_back(n);
        let mut popped = Vec::new();
        while let Some(i) = q.pop_front() {
            popped.push(i);
        }
        assert_eq!(popped, [want, vec![n]].concat());
        assert_eq!(q.len(), 0);
        assert!(q.chunks.is_empty());
        assert_eq!(q.pop_front(), None);
    }
}
