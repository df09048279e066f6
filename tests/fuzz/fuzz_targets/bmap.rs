//! bmap parsing and range arithmetic: a parsed map is inside its image, sorted and disjoint, and
//! survives its own round trip.
#![no_main]

use kiln::artifact::bmap::Bmap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(map) = Bmap::parse(text) else {
        return;
    };
    let mut next = 0;
    for r in &map.ranges {
        assert!(r.first >= next && r.first <= r.last && r.last < map.blocks_count());
        next = r.last + 1;
        let (a, b) = r.byte_span(map.block_size, map.image_size);
        assert!(a <= b && b <= map.image_size);
    }
    if map.block_size == kiln::artifact::bmap::BLOCK_SIZE {
        let again = Bmap::parse(&map.to_xml()).expect("kiln reads what it writes");
        assert_eq!(again, map);
    }
});
