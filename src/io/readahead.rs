//! A reader that runs its source on a thread of its own, a few MiB ahead of the consumer: layer
//! decompression (one core's work) then overlaps with writing the unpacked files (another's).

use std::io::{self, Read};
use std::sync::mpsc::{Receiver, sync_channel};

const CHUNK: usize = 1 << 20;
/// Chunks in flight: enough to ride over a slow file write, little memory.
const DEPTH: usize = 8;

pub struct ReadAhead {
    rx: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ReadAhead {
    /// Starts reading `src` on a new thread. Dropping the `ReadAhead` stops it at its next chunk.
    pub fn new<R: Read + Send + 'static>(mut src: R) -> Self {
        let (tx, rx) = sync_channel(DEPTH);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                // Fill whole chunks: decoders return a few KiB per call.
                let res = loop {
                    match src.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == CHUNK {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                let end = filled < CHUNK;
                let msg = match res {
                    Ok(()) => Ok(buf),
                    Err(e) => Err(e),
                };
                let failed = msg.is_err();
                if tx.send(msg).is_err() || failed || end {
                    return;
                }
            }
        });
        ReadAhead {
            rx,
            current: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    // A short chunk is the last one.
                    self.done = buf.len() < CHUNK;
                    self.current = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the reading thread stopped"));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_everything_in_order() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut got = Vec::new();
            ReadAhead::new(std::io::Cursor::new(data.clone()))
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, data, "length {len}");
        }
    }

    #[test]
    fn passes_errors_on() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt"));
                }
                let n = b.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut got = Vec::new();
        let err = ReadAhead::new(Broken(CHUNK * 2 + 5))
            .read_to_end(&mut got)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(got.len(), CHUNK * 2);
    }
}
