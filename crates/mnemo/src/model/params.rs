//! The flat f32 parameter buffer of a [`super::Model`] ([`Params`]): a heap vector, or — for a
//! model whose large weights live packed elsewhere (an official DeepSeek-V4 checkpoint
//! loaded by `io::v4_packed`) — an anonymous zero-filled mapping reserved without swap
//! accounting (`MAP_NORESERVE`), so the ranges of the weights that have no f32 copy cost
//! address space only: their pages are never written, and a page is resident only once
//! touched.
//!
//! Both dereference to `[f32]` of the layout's length, so every offset of
//! [`super::ParamLayout`] stays valid; nothing but `Params::reserved`'s caller decides which
//! ranges are filled.

use std::ops::{Deref, DerefMut};

/// See the module doc.
pub struct Params(Store);

enum Store {
    Heap(Vec<f32>),
    Reserved { map: memmap2::MmapMut, len: usize },
}

impl Params {
    /// `n` zeros on the heap.
    pub fn zeros(n: usize) -> Self {
        Params(Store::Heap(vec![0.0; n]))
    }

    /// `n` zeros in a lazily committed anonymous mapping (see the module doc): only the pages
    /// that are written become resident.
    pub fn reserved(n: usize) -> std::io::Result<Self> {
        if n == 0 {
            return Ok(Self::zeros(0));
        }
        let map = memmap2::MmapOptions::new()
            .len(n * std::mem::size_of::<f32>())
            .no_reserve_swap()
            .map_anon()?;
        Ok(Params(Store::Reserved { map, len: n }))
    }

    /// Whether this is a reserved mapping ([`Params::reserved`]).
    pub fn is_reserved(&self) -> bool {
        matches!(self.0, Store::Reserved { .. })
    }
}

impl From<Vec<f32>> for Params {
    fn from(v: Vec<f32>) -> Self {
        Params(Store::Heap(v))
    }
}

impl Deref for Params {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            Store::Heap(v) => v,
            // SAFETY: the mapping is `len` f32s long, page-aligned, zero-initialised (a valid
            // f32 bit pattern) and owned by `self`.
            Store::Reserved { map, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const f32, *len)
            },
        }
    }
}

impl DerefMut for Params {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            Store::Heap(v) => v,
            // SAFETY: as in `deref`, borrowed mutably through `&mut self`.
            Store::Reserved { map, len } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut f32, *len)
            },
        }
    }
}

impl Clone for Params {
    /// A heap copy (of a reserved buffer too: the copy reads every page).
    fn clone(&self) -> Self {
        Params(Store::Heap(self.to_vec()))
    }
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Params({} f32{})",
            self.len(),
            if self.is_reserved() { ", reserved" } else { "" }
        )
    }
}

impl PartialEq for Params {
    fn eq(&self, o: &Self) -> bool {
        self[..] == o[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_buffers_read_as_zeros_and_write() {
        let mut p = Params::reserved(3 << 20).unwrap();
        assert!(p.is_reserved() && p.len() == 3 << 20);
        assert_eq!(p[12345], 0.0);
        p[7] = 2.5;
        assert_eq!(p[7], 2.5);
        let q = p.clone();
        assert!(!q.is_reserved() && q == p);
        assert_eq!(Params::from(vec![1.0, 2.0])[1], 2.0);
    }
}
