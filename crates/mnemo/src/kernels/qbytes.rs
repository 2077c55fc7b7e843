//! The bytes of a quantised matrix ([`QBytes`]): owned, or a range of a shared read-only
//! buffer (e.g. a memory-mapped checkpoint file, so a packed expert's codes are read from the
//! page cache only when a token routes to it). The kernels see `[u8]` either way.

use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

/// A shared read-only byte buffer (anything that is `[u8]`: a `Vec<u8>`, a memory map).
pub type SharedBuf = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// See the module doc. Writing through `DerefMut` first copies a shared range into an owned
/// vector (copy on write: the shared buffer is never modified).
#[derive(Clone)]
pub enum QBytes {
    Owned(Vec<u8>),
    Shared(SharedBuf, Range<usize>),
}

impl QBytes {
    /// Bytes `range` of `buf` (checked: panics when out of bounds, a caller's bug).
    pub fn shared(buf: SharedBuf, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= (*buf).as_ref().len(),
            "QBytes::shared: range {range:?} outside a buffer of {} bytes",
            (*buf).as_ref().len()
        );
        QBytes::Shared(buf, range)
    }

    /// Whether the bytes are a range of a shared buffer.
    pub fn is_shared(&self) -> bool {
        matches!(self, QBytes::Shared(..))
    }

    /// The sub-range `r` (relative) of these bytes, sharing the buffer when shared.
    pub fn slice(&self, r: Range<usize>) -> QBytes {
        match self {
            QBytes::Owned(v) => QBytes::Owned(v[r].to_vec()),
            QBytes::Shared(b, r0) => {
                assert!(r.end <= r0.len(), "QBytes::slice out of range");
                QBytes::Shared(b.clone(), r0.start + r.start..r0.start + r.end)
            }
        }
    }
}

impl From<Vec<u8>> for QBytes {
    fn from(v: Vec<u8>) -> Self {
        QBytes::Owned(v)
    }
}

impl Deref for QBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            QBytes::Owned(v) => v,
            QBytes::Shared(b, r) => &(**b).as_ref()[r.clone()],
        }
    }
}

impl DerefMut for QBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        if let QBytes::Shared(..) = self {
            *self = QBytes::Owned(self.to_vec());
        }
        match self {
            QBytes::Owned(v) => v,
            QBytes::Shared(..) => unreachable!("made owned above"),
        }
    }
}

impl std::fmt::Debug for QBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QBytes::Owned(v) => write!(f, "QBytes::Owned({} bytes)", v.len()),
            QBytes::Shared(_, r) => write!(f, "QBytes::Shared({r:?})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_ranges_slice_and_copy_on_write() {
        let buf: SharedBuf = Arc::new((0u8..100).collect::<Vec<u8>>());
        let mut s = QBytes::shared(buf.clone(), 10..20);
        assert_eq!(&s[..3], &[10, 11, 12]);
        let t = s.slice(2..4);
        assert!(t.is_shared() && t[..] == [12, 13]);
        s[0] = 99;
        assert!(!s.is_shared() && s[0] == 99 && s.len() == 10);
        assert_eq!((*buf).as_ref()[10], 10, "the shared buffer is not modified");
        assert_eq!(&QBytes::from(vec![1, 2]).slice(1..2)[..], &[2]);
    }
}
