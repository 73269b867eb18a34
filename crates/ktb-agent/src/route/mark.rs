//! A developer's mark: how the router tells that request belongs to them.
//!
//! A mark `NAME=VALUE` matches a request that carries header `NAME` with
//! exactly `VALUE`, or whose W3C `baggage` header has the entry
//! `NAME=VALUE`. Baggage is what tracing libraries propagate from service
//! to service, so a mark set once at the edge still reaches a developer's
//! pod several hops deep; a plain header is what a developer types in curl.
//! Matching runs on every request, so it allocates nothing.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The header that carries W3C baggage (<https://www.w3.org/TR/baggage/>).
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// A developer's mark: a request whose header `header` equals `value`, or
/// whose W3C `baggage` header has an entry with key `header` and value
/// `value`, belongs to that developer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The header name (lowercase, as HTTP/2 sends it; header names are
    /// case-insensitive) and, for baggage, the entry's key.
    pub header: HeaderName,
    /// The exact value, compared byte for byte (after percent-decoding, in
    /// baggage).
    pub value: String,
}

impl Mark {
    /// Parses `NAME=VALUE`: NAME a valid header name, VALUE non-empty
    /// visible ASCII without surrounding spaces (anything else could never
    /// arrive intact in a header).
    pub fn parse(s: &str) -> Result<Mark, String> {
        let Some((name, value)) = s.split_once('=') else {
            return Err(format!(
                "mark {s:?}: expected NAME=VALUE, e.g. x-ktb-mark=alice"
            ));
        };
        if name.is_empty() || value.is_empty() {
            return Err(format!("mark {s:?}: both NAME and VALUE must be non-empty"));
        }
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("mark {s:?}: {name:?} is not a valid header name"))?;
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "mark {s:?}: the value must be visible ASCII without spaces"
            ));
        }
        Ok(Mark {
            header,
            value: value.to_owned(),
        })
    }

    /// Whether a request with these headers belongs to this mark's owner.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let wanted = self.value.as_bytes();
        headers
            .get_all(&self.header)
            .iter()
            .any(|v| v.as_bytes() == wanted)
            || headers
                .get_all(BAGGAGE)
                .iter()
                .any(|baggage| self.in_baggage(baggage))
    }

    /// Whether one `baggage` header value lists `header=value`. Entries are
    /// `key=value;properties`, separated by commas, with optional spaces
    /// around each part; values may be percent-encoded.
    fn in_baggage(&self, baggage: &HeaderValue) -> bool {
        let key_wanted = self.header.as_str().as_bytes();
        baggage.as_bytes().split(|&b| b == b',').any(|entry| {
            let pair = entry.split(|&b| b == b';').next().unwrap_or_default();
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                return false;
            };
            let key = trim(&pair[..eq]);
            let value = trim(&pair[eq + 1..]);
            key.eq_ignore_ascii_case(key_wanted) && percent_decoded_equals(value, &self.value)
        })
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.header, self.value)
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Compares a percent-encoded baggage value with a plain one without
/// decoding into a buffer. A malformed escape never matches.
fn percent_decoded_equals(encoded: &[u8], plain: &str) -> bool {
    let mut plain = plain.bytes();
    let mut i = 0;
    while i < encoded.len() {
        let byte = if encoded[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            let (Some(high), Some(low)) = (hex(encoded.get(i + 1)), hex(encoded.get(i + 2))) else {
                return false;
            };
            i += 3;
            (high * 16 + low) as u8
        } else {
            i += 1;
            encoded[i - 1]
        };
        if plain.next() != Some(byte) {
            return false;
        }
    }
    plain.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn parse_accepts_name_value_and_displays_it_back() {
        let mark = Mark::parse("X-KTB-Mark=dev-a").unwrap();
        assert_eq!(mark.header, HeaderName::from_static("x-ktb-mark"));
        assert_eq!(mark.value, "dev-a");
        assert_eq!(mark.to_string(), "x-ktb-mark=dev-a");
        assert_eq!(Mark::parse("a=b=c").unwrap().value, "b=c");
    }

    #[test]
    fn parse_rejects_malformed_marks() {
        for bad in [
            "",
            "x-ktb-mark",
            "=dev-a",
            "x-ktb-mark=",
            "bad name=dev-a",
            "x(y)=dev-a",
            "x-ktb-mark=dev a",
            "x-ktb-mark=dév",
        ] {
            assert!(Mark::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn matches_the_header_whatever_its_case_but_only_the_exact_value() {
        let mark = Mark::parse("x-ktb-mark=dev-a").unwrap();
        assert!(mark.matches(&headers(&[("X-Ktb-Mark", "dev-a")])));
        assert!(mark.matches(&headers(&[
            ("x-ktb-mark", "other"),
            ("x-ktb-mark", "dev-a")
        ])));
        assert!(!mark.matches(&headers(&[("x-ktb-mark", "dev-ab")])));
        assert!(!mark.matches(&headers(&[("x-ktb-mark", "DEV-A")])));
        assert!(!mark.matches(&headers(&[("x-ktb-mark", " dev-a")])));
        assert!(!mark.matches(&headers(&[("x-other", "dev-a")])));
        assert!(!mark.matches(&HeaderMap::new()));
    }

    #[test]
    fn matches_a_baggage_entry() {
        let mark = Mark::parse("x-ktb-mark=dev-a").unwrap();
        let matching = [
            "a=1,x-ktb-mark=dev-a;prop=1, b=2",
            "x-ktb-mark=dev-a",
            " X-KTB-Mark = dev-a ",
            "a=1, x-ktb-mark=dev%2Da",
        ];
        for baggage in matching {
            assert!(
                mark.matches(&headers(&[("baggage", baggage)])),
                "{baggage:?}"
            );
        }
        let other = [
            "a=1,x-ktb-mark=dev-b;prop=1, b=2",
            "x-ktb-mark=dev-ab",
            "x-ktb-markx=dev-a",
            "a=x-ktb-mark=dev-a",
            "a=1;x-ktb-mark=dev-a",
            "x-ktb-mark=dev%2",
            "x-ktb-mark",
            "",
        ];
        for baggage in other {
            assert!(
                !mark.matches(&headers(&[("baggage", baggage)])),
                "{baggage:?}"
            );
        }
        assert!(mark.matches(&headers(&[
            ("baggage", "a=1"),
            ("baggage", "x-ktb-mark=dev-a")
        ])));
    }
}
