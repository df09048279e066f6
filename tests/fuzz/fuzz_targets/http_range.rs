//! `Range:` headers as `kiln serve` reads them: a satisfiable range always lies inside the file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) >> (data[0] % 64);
    let Ok(value) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Some((start, end)) = kiln::deliver::serve::satisfiable_range(value, size) {
        assert!(
            start <= end && end < size,
            "{value:?} on {size} bytes gave {start}..={end}"
        );
    }
});
