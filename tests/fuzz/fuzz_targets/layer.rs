//! OCI layer unpacking into a temporary staging directory: any tar (plain or compressed) is
//! unpacked or refused, and nothing is written outside the staging directory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let blob = dir.path().join("layer");
    std::fs::write(&blob, data).expect("writing the layer");
    let staging = dir.path().join("stage");
    let _ = kiln::base::unpack::unpack(&[blob], &staging, 0);
    // Only the layer and the staging tree may exist beside each other.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listing")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        names.iter().all(|n| n == "layer" || n == "stage"),
        "{names:?}"
    );
    kiln::util::fsutil::make_writable(&staging);
});
