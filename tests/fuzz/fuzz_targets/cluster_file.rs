//! Cluster files: any text is resolved into nodes or refused with diagnostics, never a panic.
//! Profiles come from the repository's images/ (KILN_HOME), as for a user's checkout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, text).expect("writing the cluster file");
    // SAFETY (of set_var): fuzz targets run one input at a time on one thread.
    unsafe { std::env::set_var("KILN_HOME", concat!(env!("CARGO_MANIFEST_DIR"), "/../..")) };
    let _ = kiln::plan::resolve::load(&path);
});
