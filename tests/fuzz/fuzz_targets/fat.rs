//! FAT reading and stamping, as kiln does it on a boot partition: the used-cluster map straight
//! from the BPB and FAT, then fatfs opening, reading and writing the seed files copy-on-write.
#![no_main]

use std::io::Cursor;

use kiln::disk::{CowDevice, Partition};
use kiln::fs::fat::{self, FatVolume};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let whole = Partition {
        index: 1,
        start: 0,
        size: data.len() as u64,
        type_code: "0x0c".into(),
        name: None,
        guid: None,
    };
    let _ = fat::used_ranges(&mut Cursor::new(data), &whole);
    let mut dev = CowDevice::new(Cursor::new(data), data.len() as u64);
    if let Ok(vol) = FatVolume::on(&mut dev, fat::fat_datetime(0)) {
        let _ = vol.label();
        let _ = vol.newest_root_timestamp();
        let _ = vol.read_file("user-data");
        if vol
            .write_file("user-data", b"#cloud-config\nhostname: fuzz\n")
            .is_ok()
        {
            let _ = vol.close();
        }
    }
});
