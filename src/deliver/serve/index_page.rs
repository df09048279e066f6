//! The index at `/` as a browser sees it: one HTML table of the served images, chosen when the
//! request's `Accept` header prefers `text/html` to `application/json`. Programs keep the JSON
//! (`/index.json`, or `/` with `Accept: application/json` or `*/*`); this module only renders.
//!
//! Names come from the filesystem, so every name is percent-encoded as one path segment in a link
//! (a `:`, `?`, `#` or `%` in a name cannot turn it into another URL) and HTML-escaped wherever
//! it is shown.

use super::Entry;

/// Whether `accept` (an `Accept` header) ranks `text/html` above `application/json` (RFC 9110
/// 12.5.1: the most specific matching range gives each type its quality). A missing header or
/// `*/*` ranks them equal, which keeps the JSON that `/` has always answered.
pub fn prefers_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    quality(accept, "text", "html") > quality(accept, "application", "json")
}

/// The quality `accept` gives `kind/sub`: from its most specific matching range, 0 if none.
fn quality(accept: &str, kind: &str, sub: &str) -> f32 {
    let mut best: Option<(u8, f32)> = None;
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let Some((k, s)) = media.split_once('/') else {
            continue;
        };
        let specificity = match (k, s) {
            (k, s) if k == kind && s == sub => 2,
            (k, "*") if k == kind => 1,
            ("*", "*") => 0,
            _ => continue,
        };
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q=").map(str::trim))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if best.is_none_or(|(b, _)| specificity > b) {
            best = Some((specificity, q));
        }
    }
    best.map_or(0.0, |(_, q)| q)
}

/// `s` with the five characters that mean something in HTML text or attributes escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in a link.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A relative link to the file `name` in the served directory.
fn href(name: &str) -> String {
    // "./" keeps a name that starts like a scheme from ever reading as one, even before encoding.
    format!("./{}", percent_encoding::utf8_percent_encode(name, SEGMENT))
}

/// The index page for `entries`.
pub fn render(entries: &[Entry]) -> String {
    let mut rows = String::new();
    for e in entries {
        let link = escape(&href(&e.name));
        let name = escape(&e.name);
        rows.push_str(&format!(
            "<tr><td><a href=\"{link}\">{name}</a></td>\
             <td class=\"n\" title=\"{bytes} bytes\">{human}</td>\
             <td><a href=\"{link}.sha256sum\"><code>{sha}</code></a></td>\
             <td>{format}</td><td>{modified}</td></tr>\n",
            bytes = e.size,
            human = crate::util::diskfull::human(e.size),
            sha = escape(&e.sha256),
            format = escape(e.format),
            modified = escape(&e.modified),
        ));
    }
    if entries.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">no images here yet</td></tr>\n");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>kiln serve: images</title>\n<style>\
         body{{font-family:sans-serif;margin:1.5em}}\
         table{{border-collapse:collapse}}\
         th,td{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}}\
         td.n{{text-align:right}}code{{font-size:.85em}}\
         </style></head><body>\n<h1>Images</h1>\n\
         <table>\n<thead><tr><th>name</th><th>size</th><th>sha256</th><th>format</th>\
         <th>modified</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>\n\
         <p>The same list as JSON: <a href=\"./index.json\">index.json</a></p>\n\
         </body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_get_html_programs_json() {
        // Chromium's and Firefox's navigation Accept headers.
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,\
                        image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
        let firefox = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(prefers_html(Some(chromium)));
        assert!(prefers_html(Some(firefox)));
        assert!(prefers_html(Some("text/*")));
        for json in [
            None,
            Some("*/*"),
            Some("application/json"),
            Some("application/json, text/html;q=0.5"),
            Some("text/html;q=0.5, */*"),
            Some("text/html, application/json"),
            Some("garbage"),
        ] {
            assert!(!prefers_html(json), "{json:?}");
        }
    }

    #[test]
    fn names_are_escaped_in_text_and_encoded_in_links() {
        let e = Entry {
            name: "a&b <script>\"x'#?%:.raw".into(),
            size: 3 << 20,
            sha256: "ab".repeat(32),
            format: "raw",
            modified: "Mon, 30 Nov 2026 00:00:00 GMT".into(),
        };
        let page = render(&[e]);
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains(">a&amp;b &lt;script&gt;&quot;x&#39;#?%:.raw</a>"),
            "{page}"
        );
        assert!(
            page.contains("href=\"./a%26b%20%3Cscript%3E%22x%27%23%3F%25%3A.raw\""),
            "{page}"
        );
        assert!(page.contains("%3A.raw.sha256sum\""), "{page}");
        assert!(page.contains("3 MiB"), "{page}");
    }
}
