//! Hex-prefix ranges (`Slot` keys) and pin prefixes: parsing and canonical forms.

use std::fmt;

use crate::uuid::{hex_value, lower_hex};

/// The most hex digits a slot range may have: 4 digits = 65 536 slots.
pub const MAX_SLOT_DIGITS: u32 = 4;

/// A range of hex prefixes of one length: `"0-9"`, `"3f"`, `"00-3f"`, `"a000-afff"`.
///
/// `lo` and `hi` are the values of the first `digits` hex digits of a base_uuid; the
/// range holds every base whose first `digits` digits lie in `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotRange {
    pub digits: u32,
    pub lo: u32,
    pub hi: u32,
}

impl SlotRange {
    /// Parses a slot key, any case.
    pub fn parse(s: &str) -> Result<SlotRange, String> {
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        if a.is_empty() || b.is_empty() {
            return Err(format!(
                "`{s}` is not a hex range: write `0-9`, `3f` or `00-3f`"
            ));
        }
        if a.len() != b.len() {
            return Err(format!(
                "`{s}`: both ends of a range need the same number of hex digits"
            ));
        }
        if a.len() > MAX_SLOT_DIGITS as usize {
            return Err(format!(
                "`{s}`: a slot has at most {MAX_SLOT_DIGITS} hex digits"
            ));
        }
        let lo = parse_hex(a)
            .ok_or_else(|| format!("`{s}` is not a hex range: only 0-9 and a-f are hex digits"))?;
        let hi = parse_hex(b)
            .ok_or_else(|| format!("`{s}` is not a hex range: only 0-9 and a-f are hex digits"))?;
        if lo > hi {
            return Err(format!(
                "`{s}`: the range is empty, its start is after its end"
            ));
        }
        Ok(SlotRange {
            digits: a.len() as u32,
            lo,
            hi,
        })
    }

    /// The half-open span `[start, end)` this range covers among the `16^granularity`
    /// prefixes of `granularity` digits (`granularity >= self.digits`).
    pub fn span(&self, granularity: u32) -> (usize, usize) {
        let shift = 4 * (granularity - self.digits.min(granularity));
        (
            (self.lo as usize) << shift,
            ((self.hi as usize) + 1) << shift,
        )
    }

    /// The range with the fewest digits that covers exactly `[start, end)` of the
    /// prefixes of `granularity` digits (`start < end`).
    pub fn covering(start: usize, end: usize, granularity: u32) -> SlotRange {
        for digits in 1..granularity {
            let shift = 4 * (granularity - digits);
            let unit = 1usize << shift;
            if start.is_multiple_of(unit) && end.is_multiple_of(unit) {
                return SlotRange {
                    digits,
                    lo: (start >> shift) as u32,
                    hi: ((end >> shift) - 1) as u32,
                };
            }
        }
        SlotRange {
            digits: granularity,
            lo: start as u32,
            hi: end.saturating_sub(1) as u32,
        }
    }
}

impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.digits as usize;
        if self.lo == self.hi {
            write!(f, "{:0w$x}", self.lo)
        } else {
            write!(f, "{:0w$x}-{:0w$x}", self.lo, self.hi)
        }
    }
}

fn parse_hex(s: &str) -> Option<u32> {
    s.bytes().try_fold(0u32, |acc, c| {
        Some((acc << 4) | u32::from(hex_value(lower_hex(c)?)))
    })
}

/// Canonicalizes a pin: a prefix of a base_uuid, dashed or not, any case, to lowercase
/// hex without dashes. Dashes are only allowed where a dashed uuid has them.
pub fn canonical_pin(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a pin needs at least one hex digit".into());
    }
    let dashed = s.contains('-');
    if (dashed && s.len() > 36) || (!dashed && s.len() > 32) {
        return Err(format!("`{s}` is longer than a base_uuid"));
    }
    let mut out = String::with_capacity(32);
    for (i, c) in s.bytes().enumerate() {
        let dash_here = dashed && matches!(i, 8 | 13 | 18 | 23);
        match (dash_here, c) {
            (true, b'-') => {}
            (true, _) => {
                return Err(format!(
                    "`{s}` is not a uuid prefix: expected `-` at position {}",
                    i + 1
                ));
            }
            (false, b'-') => {
                return Err(format!(
                    "`{s}` is not a uuid prefix: a uuid has no `-` at position {}",
                    i + 1
                ));
            }
            (false, _) => match lower_hex(c) {
                Some(h) => out.push(char::from(h)),
                None => {
                    return Err(format!(
                        "`{s}` is not a uuid prefix: `{}` is not a hex digit",
                        char::from(c)
                    ));
                }
            },
        }
    }
    if out.is_empty() {
        return Err("a pin needs at least one hex digit".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ranges() {
        assert_eq!(
            SlotRange::parse("0-9"),
            Ok(SlotRange {
                digits: 1,
                lo: 0,
                hi: 9
            })
        );
        assert_eq!(
            SlotRange::parse("3F"),
            Ok(SlotRange {
                digits: 2,
                lo: 0x3f,
                hi: 0x3f
            })
        );
        assert_eq!(
            SlotRange::parse("a000-afff").map(|r| r.span(4)),
            Ok((0xa000, 0xb000))
        );
        assert_eq!(
            SlotRange::parse("a-f").map(|r| r.span(2)),
            Ok((0xa0, 0x100))
        );
        assert_eq!(
            SlotRange::parse("00-3f").map(|r| r.to_string()).as_deref(),
            Ok("00-3f")
        );
        assert!(
            SlotRange::parse("0-99")
                .unwrap_err()
                .contains("same number")
        );
        assert!(SlotRange::parse("00000").unwrap_err().contains("at most 4"));
        assert!(SlotRange::parse("g").unwrap_err().contains("hex"));
        assert!(SlotRange::parse("9-0").unwrap_err().contains("empty"));
        assert!(SlotRange::parse("-").is_err());
        assert!(SlotRange::parse("").is_err());
    }

    #[test]
    fn pins() {
        assert_eq!(
            canonical_pin("FF84E1A1-66e2").as_deref(),
            Ok("ff84e1a166e2")
        );
        assert_eq!(canonical_pin("ff84e1a166e2").as_deref(), Ok("ff84e1a166e2"));
        assert!(
            canonical_pin("ff84-e1a1")
                .unwrap_err()
                .contains("position 5")
        );
        assert!(
            canonical_pin("xyz")
                .unwrap_err()
                .contains("not a hex digit")
        );
        assert!(
            canonical_pin(&"a".repeat(33))
                .unwrap_err()
                .contains("longer")
        );
        assert!(canonical_pin("").is_err());
    }
}
