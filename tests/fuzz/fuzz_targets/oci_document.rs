//! OCI references, indexes and manifests: parsed or refused, with no blob ever found (so only
//! the document logic runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kiln::oci::reference::ImageRef::parse(text);
        let _ = kiln::oci::image::parse_rfc3339(text);
    }
    let _ = kiln::oci::image::Image::from_manifest(data, "sha256:0".into(), &mut |d| {
        Err(anyhow::anyhow!("no blob {d} in a fuzz run"))
    });
    let _ = kiln::oci::manifest::is_index_document(data);
    if let Ok(index) = kiln::oci::manifest::parse_index(data, "a fuzzed index") {
        let _ = kiln::oci::manifest::pick_platform(&index, "amd64");
    }
});
