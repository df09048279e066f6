//! Block maps in bmaptool's format (version 2.0, sha256 per range), written from what kiln knows
//! about the image and read from kiln's or `bmaptool create`'s files.
//!
//! A bmap lists the blocks that must reach the target; a writer may skip the rest. kiln maps the
//! partition table area, filesystem metadata and allocated data — never a guess from blocks that
//! merely read as zeros.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub const BLOCK_SIZE: u64 = 4096;

/// Blocks `first..=last` with the sha256 of their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub first: u64,
    pub last: u64,
    pub sha256: Option<String>,
}

impl BmapRange {
    pub fn blocks(&self) -> u64 {
        self.last - self.first + 1
    }
    /// Byte span of the range, clipped to the image size.
    pub fn byte_span(&self, block_size: u64, image_size: u64) -> (u64, u64) {
        let start = self.first * block_size;
        let end = ((self.last + 1) * block_size).min(image_size);
        (start, end)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<BmapRange>,
}

impl Bmap {
    /// A map covering the given byte ranges (absolute offsets), rounded out to whole blocks,
    /// sorted and merged.
    pub fn from_byte_ranges(image_size: u64, byte_ranges: &[(u64, u64)]) -> Bmap {
        Self::from_byte_ranges_split(image_size, byte_ranges, &[])
    }

    /// Like `from_byte_ranges`, but a range never spans one of the `boundaries` (byte offsets,
    /// such as partition starts), so the ranges inside an unchanged partition stay the same from
    /// build to build and their checksums can be reused.
    pub fn from_byte_ranges_split(
        image_size: u64,
        byte_ranges: &[(u64, u64)],
        boundaries: &[u64],
    ) -> Bmap {
        let bs = BLOCK_SIZE;
        let blocks_count = image_size.div_ceil(bs);
        let mut spans: Vec<(u64, u64)> = byte_ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(start, len)| (start / bs, ((start + len).div_ceil(bs)).min(blocks_count)))
            .filter(|(a, b)| b > a)
            .collect();
        spans.sort_unstable();
        let mut ranges: Vec<BmapRange> = Vec::new();
        for (a, b) in spans {
            match ranges.last_mut() {
                Some(r)
                    if a <= r.last + 1
                        && !boundaries
                            .iter()
                            .any(|&x| x % bs == 0 && r.first < x / bs && x / bs <= a) =>
                {
                    r.last = r.last.max(b - 1)
                }
                _ => ranges.push(BmapRange {
                    first: a,
                    last: b - 1,
                    sha256: None,
                }),
            }
        }
        Bmap {
            image_size,
            block_size: bs,
            ranges,
        }
    }

    /// Refuses a bmap made for an image of another size (the wrong bmap beside an image).
    pub fn check_image_size(&self, size: u64, image: &std::path::Path) -> Result<()> {
        if self.image_size != size {
            bail!(
                "the bmap describes a {}-byte image but {} has {size} bytes",
                self.image_size,
                image.display()
            );
        }
        Ok(())
    }

    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(BmapRange::blocks).sum()
    }

    /// Reads the image once, filling every range's sha256; returns the sha256 of the whole image.
    pub fn fill_checksums(&mut self, image: &mut File) -> Result<String> {
        let size = self.image_size;
        let mut ranges = RangeHasher::new(self, &Default::default());
        let mut whole = Sha256::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut pos = 0u64;
        while pos < size {
            let n = (buf.len() as u64).min(size - pos) as usize;
            image
                .read_exact(&mut buf[..n])
                .with_context(|| format!("reading the image at byte {pos}"))?;
            ranges.feed(pos, &buf[..n]);
            whole.update(&buf[..n]);
            pos += n as u64;
        }
        ranges.finish(self);
        Ok(hex::encode(whole.finalize()))
    }

    /// The bmap file, with its own checksum filled in as bmaptool computes it (over the file
    /// with the checksum's characters replaced by zeros).
    pub fn to_xml(&self) -> String {
        let render = |file_checksum: &str| {
            let mut s = String::new();
            s.push_str("<?xml version=\"1.0\" ?>\n");
            s.push_str(
                "<!-- Block map written by kiln: the blocks that hold the partition table,\n",
            );
            s.push_str(
                "     filesystem metadata and data. Only these need to reach the target. -->\n",
            );
            s.push_str("<bmap version=\"2.0\">\n");
            s.push_str(&format!(
                "    <ImageSize> {} </ImageSize>\n",
                self.image_size
            ));
            s.push_str(&format!(
                "    <BlockSize> {} </BlockSize>\n",
                self.block_size
            ));
            s.push_str(&format!(
                "    <BlocksCount> {} </BlocksCount>\n",
                self.blocks_count()
            ));
            s.push_str(&format!(
                "    <MappedBlocksCount> {} </MappedBlocksCount>\n",
                self.mapped_blocks()
            ));
            s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
            s.push_str(&format!(
                "    <BmapFileChecksum> {file_checksum} </BmapFileChecksum>\n"
            ));
            s.push_str("    <BlockMap>\n");
            for r in &self.ranges {
                let span = if r.first == r.last {
                    r.first.to_string()
                } else {
                    format!("{}-{}", r.first, r.last)
                };
                match &r.sha256 {
                    Some(c) => {
                        s.push_str(&format!("        <Range chksum=\"{c}\"> {span} </Range>\n"))
                    }
                    None => s.push_str(&format!("        <Range> {span} </Range>\n")),
                }
            }
            s.push_str("    </BlockMap>\n</bmap>\n");
            s
        };
        let zeros = "0".repeat(64);
        let digest = hex::encode(Sha256::digest(render(&zeros).as_bytes()));
        render(&digest)
    }

    /// Parses a bmap file (versions 1.x and 2.x; sha1, sha256 or md5 range checksums are kept
    /// only when sha256) with quick-xml's reader, then validates it (`validated`). Not the
    /// `bmap-parser` crate: its 0.2 parser panics on a malformed range (`parse().unwrap()`,
    /// `unimplemented!`) and refuses maps without per-range sha256, which `bmaptool create -c
    /// none` and version 1 files are.
    pub fn parse(xml: &str) -> Result<Bmap> {
        let doc = BmapDocument::read(xml)?;
        let version = doc
            .version
            .as_deref()
            .context("not a bmap file (no <bmap version=…>)")?;
        if !(version.starts_with("1.") || version.starts_with("2.")) {
            bail!("bmap version {version} is not supported (1.x and 2.x are)");
        }
        let text = |name: &str| -> Result<&str> {
            doc.fields
                .get(name)
                .map(String::as_str)
                .with_context(|| format!("bmap has no <{name}>"))
        };
        let number = |name: &str| -> Result<u64> {
            let t = text(name)?;
            t.parse()
                .with_context(|| format!("bmap <{name}> {t:?} is not a number"))
        };
        let image_size = number("ImageSize")?;
        let block_size = number("BlockSize")?;
        let sha256 = text("ChecksumType").is_ok_and(|t| t == "sha256");
        if sha256 && let Ok(stored) = text("BmapFileChecksum") {
            check_file_checksum(xml, stored)?;
        }
        let mut ranges = Vec::new();
        for (attr, body) in &doc.ranges {
            let block = |t: &str| -> Result<u64> {
                t.trim()
                    .parse()
                    .with_context(|| format!("bmap range {body:?} is not a block number or a-b"))
            };
            let (first, last) = match body.split_once('-') {
                Some((a, b)) => (block(a)?, block(b)?),
                None => (block(body)?, block(body)?),
            };
            let sha256 = match attr {
                Some(c) if sha256 => {
                    if c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                        bail!("bmap range {body} has a chksum {c:?} that is not a sha256");
                    }
                    Some(c.to_ascii_lowercase())
                }
                _ => None,
            };
            ranges.push(BmapRange {
                first,
                last,
                sha256,
            });
        }
        let bmap = Bmap {
            image_size,
            block_size,
            ranges,
        };
        let counts = (number("BlocksCount").ok(), number("MappedBlocksCount").ok());
        bmap.validated(counts)
    }

    /// Checks what bmaptool checks before it writes a byte (block size, counts, ranges inside the
    /// image), and what it assumes: ranges sorted and disjoint. Ranges are sorted here; overlapping
    /// or repeated ones are refused, since merging would invalidate their checksums.
    fn validated(mut self, (blocks, mapped): (Option<u64>, Option<u64>)) -> Result<Bmap> {
        let bs = self.block_size;
        if bs < 512 || !bs.is_power_of_two() || bs > 1 << 30 {
            bail!("bmap <BlockSize> {bs} is not a power of two from 512 bytes to 1 GiB");
        }
        if self.image_size > 1 << 62 {
            bail!("bmap <ImageSize> {} is beyond any disk", self.image_size);
        }
        let count = self.blocks_count();
        if let Some(declared) = blocks
            && declared != count
        {
            bail!(
                "inconsistent bmap: <BlocksCount> {declared} but a {}-byte image has {count} blocks of {bs} bytes",
                self.image_size
            );
        }
        self.ranges.sort_by_key(|r| (r.first, r.last));
        let mut next_free = 0u64;
        for r in &self.ranges {
            if r.last < r.first || r.last >= count {
                bail!(
                    "bmap range {}-{} lies outside the {}-byte image ({count} blocks)",
                    r.first,
                    r.last,
                    self.image_size
                );
            }
            if r.first < next_free {
                bail!(
                    "bmap range {}-{} overlaps an earlier range (a damaged or hand-edited bmap)",
                    r.first,
                    r.last
                );
            }
            next_free = r.last + 1;
        }
        if let Some(declared) = mapped
            && declared != self.mapped_blocks()
        {
            bail!(
                "inconsistent bmap: <MappedBlocksCount> {declared} but its ranges map {} blocks",
                self.mapped_blocks()
            );
        }
        Ok(self)
    }
}

/// What a bmap file says, as text: the `version` attribute, the top-level fields, and each
/// `<Range>`'s `chksum` attribute and body.
#[derive(Default)]
struct BmapDocument {
    version: Option<String>,
    fields: BTreeMap<String, String>,
    ranges: Vec<(Option<String>, String)>,
}

impl BmapDocument {
    fn read(xml: &str) -> Result<BmapDocument> {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut doc = BmapDocument::default();
        let mut path: Vec<String> = Vec::new();
        let mut chksum = None;
        loop {
            let event = reader.read_event().with_context(|| {
                format!(
                    "the bmap is not well-formed XML (at byte {})",
                    reader.buffer_position()
                )
            })?;
            match event {
                Event::Start(e) => {
                    let name = e.local_name().as_ref().to_string();
                    let attr = |key: &str| -> Result<Option<String>> {
                        Ok(match e.try_get_attribute(key)? {
                            Some(a) => Some(
                                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)?
                                    .into_owned(),
                            ),
                            None => None,
                        })
                    };
                    match (path.len(), name.as_str()) {
                        (0, "bmap") => doc.version = attr("version")?,
                        (0, other) => bail!("not a bmap file (its root element is <{other}>)"),
                        (2, "Range") => chksum = attr("chksum")?,
                        _ => {}
                    }
                    path.push(name);
                }
                Event::Text(t) => {
                    let text = t.xml10_content().trim().to_string();
                    match path
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .as_slice()
                    {
                        ["bmap", "BlockMap", "Range"] => doc.ranges.push((chksum.take(), text)),
                        // The guard records the field; it matches only a repeat.
                        ["bmap", field]
                            if !text.is_empty()
                                && doc.fields.insert(field.to_string(), text).is_some() =>
                        {
                            bail!("bmap has <{field}> twice");
                        }
                        _ => {}
                    }
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(doc)
    }
}

/// bmaptool's check of a 2.x file: sha256 over the file with the stored checksum's characters
/// replaced by zeros.
fn check_file_checksum(xml: &str, stored: &str) -> Result<()> {
    let zeroed = xml.replacen(stored, &"0".repeat(stored.len()), 1);
    let computed = hex::encode(Sha256::digest(zeroed.as_bytes()));
    if !computed.eq_ignore_ascii_case(stored) {
        bail!(
            "the bmap file's own checksum does not match (stored {stored}, computed {computed}): a damaged or edited bmap"
        );
    }
    Ok(())
}

/// Computes the sha256 of every range of a bmap from the image's bytes, fed in order in chunks of
/// any size.
pub struct RangeHasher {
    spans: Vec<(u64, u64)>,
    sums: Vec<Option<String>>,
    idx: usize,
    current: Option<Sha256>,
}

impl RangeHasher {
    /// A hasher for `bmap`'s ranges; ranges found in `known` (by first and last block) take
    /// that checksum and are not hashed again.
    pub fn new(bmap: &Bmap, known: &BTreeMap<(u64, u64), String>) -> Self {
        let spans: Vec<(u64, u64)> = bmap
            .ranges
            .iter()
            .map(|r| r.byte_span(bmap.block_size, bmap.image_size))
            .collect();
        let sums = bmap
            .ranges
            .iter()
            .map(|r| known.get(&(r.first, r.last)).cloned())
            .collect();
        RangeHasher {
            sums,
            spans,
            idx: 0,
            current: None,
        }
    }

    /// Feeds `chunk`, which starts at byte `start` of the image.
    pub fn feed(&mut self, start: u64, chunk: &[u8]) {
        let end = start + chunk.len() as u64;
        while self.idx < self.spans.len() {
            let (rs, re) = self.spans[self.idx];
            if rs >= end {
                break;
            }
            let (a, b) = (rs.max(start), re.min(end));
            if b > a && self.sums[self.idx].is_none() {
                self.current
                    .get_or_insert_with(Sha256::new)
                    .update(&chunk[(a - start) as usize..(b - start) as usize]);
            }
            if re > end {
                break;
            }
            if let Some(h) = self.current.take() {
                self.sums[self.idx] = Some(hex::encode(h.finalize()));
            } else if self.sums[self.idx].is_none() {
                self.sums[self.idx] = Some(hex::encode(Sha256::new().finalize()));
            }
            self.idx += 1;
        }
    }

    /// Stores the sums in `bmap`'s ranges.
    pub fn finish(self, bmap: &mut Bmap) {
        for (r, s) in bmap.ranges.iter_mut().zip(self.sums) {
            r.sha256 = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_round_out_and_merge() {
        let b = Bmap::from_byte_ranges(
            10 * 4096,
            &[(100, 10), (4096, 4096), (3 * 4096 + 1, 1), (9 * 4096, 9999)],
        );
        let spans: Vec<_> = b.ranges.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(spans, vec![(0, 1), (3, 3), (9, 9)]);
        assert_eq!(b.mapped_blocks(), 4);
    }

    #[test]
    fn xml_round_trips_and_self_checksum_is_bmaptools() {
        let mut b = Bmap::from_byte_ranges(3 * 4096 + 5, &[(0, 4096), (2 * 4096, 4096 + 5)]);
        b.ranges[0].sha256 = Some("ab".repeat(32));
        b.ranges[1].sha256 = Some("cd".repeat(32));
        let xml = b.to_xml();
        let back = Bmap::parse(&xml).unwrap();
        assert_eq!(back, b);
        // Recompute as bmaptool does: zero the stored checksum, hash the whole file.
        let stored = xml
            .split("<BmapFileChecksum> ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let zeroed = xml.replacen(stored, &"0".repeat(64), 1);
        assert_eq!(stored, hex::encode(Sha256::digest(zeroed.as_bytes())));
    }

    #[test]
    fn checksums_cover_partial_last_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut data = vec![0u8; 2 * 4096 + 10];
        data[4096 * 2 + 3] = 7;
        std::fs::write(&p, &data).unwrap();
        let mut b = Bmap::from_byte_ranges(data.len() as u64, &[(4096 * 2, 10)]);
        let whole = b.fill_checksums(&mut File::open(&p).unwrap()).unwrap();
        assert_eq!(whole, hex::encode(Sha256::digest(&data)));
        assert_eq!(
            b.ranges[0].sha256.as_deref().unwrap(),
            hex::encode(Sha256::digest(&data[8192..]))
        );
    }

    /// A 2.0 bmap of a 10-block image with `ranges` and a valid file checksum.
    fn bmap_text(block_size: &str, ranges: &[&str], mapped: u64) -> String {
        let body: String = ranges
            .iter()
            .map(|r| format!("<Range> {r} </Range>\n"))
            .collect();
        let xml = format!(
            "<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n<ImageSize> 40960 </ImageSize>\n\
             <BlockSize> {block_size} </BlockSize>\n<BlocksCount> 10 </BlocksCount>\n\
             <MappedBlocksCount> {mapped} </MappedBlocksCount>\n<ChecksumType> sha256 </ChecksumType>\n\
             <BmapFileChecksum> {} </BmapFileChecksum>\n<BlockMap>\n{body}</BlockMap>\n</bmap>\n",
            "0".repeat(64)
        );
        let sum = hex::encode(Sha256::digest(xml.as_bytes()));
        xml.replacen(&"0".repeat(64), &sum, 1)
    }

    #[test]
    fn hostile_bmaps_are_refused_or_normalised() {
        let err = |x: &str| Bmap::parse(x).unwrap_err().to_string();
        assert!(err(&bmap_text("0", &["0-1"], 2)).contains("BlockSize"));
        assert!(err(&bmap_text("4000", &["0-1"], 2)).contains("BlockSize"));
        assert!(err(&bmap_text("4096", &["0-18446744073709551615"], 0)).contains("outside"));
        assert!(err(&bmap_text("4096", &["3-2"], 0)).contains("outside"));
        assert!(err(&bmap_text("4096", &["0-3", "2-5"], 10)).contains("overlaps"));
        assert!(err(&bmap_text("4096", &["1", "1"], 2)).contains("overlaps"));
        assert!(err(&bmap_text("4096", &["1"], 5)).contains("MappedBlocksCount"));
        assert!(err(&bmap_text("4096", &["1-x"], 1)).contains("not a block number"));
        let edited = bmap_text("4096", &["1"], 1).replace("<Range> 1 ", "<Range> 2 ");
        assert!(err(&edited).contains("own checksum"));
        // Unsorted but disjoint: the same map, in order.
        let b = Bmap::parse(&bmap_text("4096", &["7-9", "0-1", "4"], 6)).unwrap();
        let spans: Vec<_> = b.ranges.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(spans, vec![(0, 1), (4, 4), (7, 9)]);
    }

    /// Found by the `bmap` fuzz target: a `chksum` that is not a sha256 (and another `chksum="`
    /// inside it) was taken as one; what kiln wrote back read differently.
    #[test]
    fn range_checksums_must_be_sha256() {
        let xml = bmap_text("4096", &["1"], 1);
        let bad = xml.replacen(
            "<Range> 1 </Range>",
            "<Range chksum=\"ababagechksum=\"> 1 </Range>",
            1,
        );
        let sum = |x: &str| {
            let zeroed = x.replacen(
                &x[x.find("<BmapFileChecksum> ").unwrap() + 19..][..64],
                &"0".repeat(64),
                1,
            );
            zeroed.replacen(
                &"0".repeat(64),
                &hex::encode(Sha256::digest(zeroed.as_bytes())),
                1,
            )
        };
        let e = Bmap::parse(&sum(&bad)).unwrap_err().to_string();
        assert!(e.contains("not a sha256"), "{e}");
        let good = xml.replacen(
            "<Range> 1 </Range>",
            &format!("<Range chksum=\"{}\"> 1 </Range>", "AB".repeat(32)),
            1,
        );
        let b = Bmap::parse(&sum(&good)).unwrap();
        assert_eq!(
            b.ranges[0].sha256.as_deref(),
            Some("ab".repeat(32).as_str())
        );
        assert_eq!(Bmap::parse(&b.to_xml()).unwrap(), b);
        assert!(Bmap::parse("<bmap version=\"2.0\"><ImageSize>1</ImageSize>").is_err());
        assert!(
            Bmap::parse("<html/>")
                .unwrap_err()
                .to_string()
                .contains("not a bmap")
        );
    }
}
