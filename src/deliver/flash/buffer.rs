//! Buffers aligned for O_DIRECT, without unsafe code: a Vec with room to spare, used from the
//! first 4096-aligned byte.

/// The alignment O_DIRECT asks of buffers (a 4096-byte logical block covers 512 too).
pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    raw: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let offset = (ALIGN - (raw.as_ptr() as usize) % ALIGN) % ALIGN;
        AlignedBuf { raw, offset, len }
    }

    pub fn capacity(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + self.len]
    }

    /// The first `n` bytes, aligned, writable.
    pub fn slice_mut(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(self.len);
        &mut self.raw[self.offset..self.offset + n]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned() {
        for len in [1, 512, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.slice_mut(len).as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.as_slice().len(), len);
        }
    }
}
