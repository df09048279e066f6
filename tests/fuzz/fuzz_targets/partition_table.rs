//! MBR and GPT reading: any bytes give a layout or an error, never a panic, an overflow or an
//! allocation the image could not back.
#![no_main]

use std::io::Cursor;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for sector in [512, 4096] {
        if let Ok(layout) = kiln::disk::read_layout(&mut Cursor::new(data), sector) {
            for p in &layout.partitions {
                assert!(
                    p.end() <= data.len() as u64,
                    "a partition past the end was accepted"
                );
            }
        }
    }
});
