//! The Android sparse and QCOW2 writers on any image and any map of it: they write or refuse,
//! and what they write expands back to the image's mapped bytes (simg2img and qemu-img are the
//! judges in the integration tests; here the invariant is no panic and no overflow).
#![no_main]

use kiln::artifact::bmap::Bmap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The first bytes say how to cut the image into mapped ranges.
    let (control, image) = data.split_at(4);
    let size = image.len() as u64 * u64::from(control[0] % 8 + 1) * 512;
    let ranges: Vec<(u64, u64)> = control[1..]
        .iter()
        .enumerate()
        .map(|(i, &b)| (i as u64 * 8192 + u64::from(b) * 64, u64::from(b) * 97))
        .collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let raw = dir.path().join("image.raw");
    let f = std::fs::File::create(&raw).expect("creating the image");
    std::os::unix::fs::FileExt::write_all_at(&f, image, 0).expect("writing the image");
    f.set_len(size.max(image.len() as u64))
        .expect("sizing the image");
    let len = f.metadata().expect("metadata").len();
    let map = Bmap::from_byte_ranges(len, &ranges);
    let bmap = if control[0] & 0x80 != 0 {
        Some(&map)
    } else {
        None
    };
    let _ = kiln::artifact::android_sparse::convert(&raw, bmap, &dir.path().join("out.simg"), None);
    let _ = kiln::artifact::qcow2::convert(&raw, bmap, &dir.path().join("out.qcow2"));
});
