//! The threaded hash pipeline: a stream is read once and its chunks are hashed on other cores
//! while the reader goes on. Building an artifact (whole-image sha256 and bmap ranges) and
//! flashing one (checksum file, bmap check, read-back digests) both hash through here.

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use sha2::{Digest, Sha256};

use super::bmap::RangeHasher;

/// Chunks in flight between the reader and one hashing thread.
pub const DEPTH: usize = 4;

/// `len` bytes of a stream at offset `pos`, shared between the threads that use them.
pub struct Chunk<B> {
    pub pos: u64,
    pub buf: Arc<B>,
    pub len: usize,
}

impl<B: AsRef<[u8]>> Chunk<B> {
    pub fn data(&self) -> &[u8] {
        &AsRef::<[u8]>::as_ref(&*self.buf)[..self.len]
    }
}

/// Anything that digests a stream chunk by chunk, in order.
pub trait Feed: Send {
    fn feed(&mut self, pos: u64, data: &[u8]);
}

impl Feed for Sha256 {
    fn feed(&mut self, _pos: u64, data: &[u8]) {
        self.update(data);
    }
}

impl Feed for RangeHasher {
    fn feed(&mut self, pos: u64, data: &[u8]) {
        RangeHasher::feed(self, pos, data);
    }
}

/// Starts `hasher` on its own thread; returns where to send chunks and the hasher, back when the
/// sender is dropped. Each chunk's buffer goes to `recycle` afterwards, if given, for reuse.
pub fn spawn<'scope, H, B>(
    scope: &'scope Scope<'scope, '_>,
    mut hasher: H,
    recycle: Option<SyncSender<Arc<B>>>,
) -> (SyncSender<Chunk<B>>, ScopedJoinHandle<'scope, H>)
where
    H: Feed + 'scope,
    B: AsRef<[u8]> + Send + Sync + 'scope,
{
    let (tx, rx) = sync_channel::<Chunk<B>>(DEPTH);
    let handle = scope.spawn(move || {
        for chunk in rx {
            hasher.feed(chunk.pos, chunk.data());
            if let Some(r) = &recycle {
                let _ = r.send(chunk.buf);
            }
        }
        hasher
    });
    (tx, handle)
}
