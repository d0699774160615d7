//! Free `WxH` sizes: a model that takes any size within bounds (multiples, aspect ratio, edge and pixel
//! limits) rather than a list. Parsing is strict (plain ASCII digits, no sign, no leading zero) and no input
//! can overflow the arithmetic.

use serde::{Deserialize, Serialize};

/// The bounds of a model's free sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FreeSizes {
    /// Both edges are multiples of this.
    pub multiple: u32,
    /// Long edge ≤ `max_ratio` × short edge.
    pub max_ratio: u32,
    /// Longest edge, in pixels.
    pub max_edge: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

/// An edge written with more digits than this is over any `max_edge` a `u32` can hold below 100,000.
const EDGE_MAX_DIGITS: usize = 5;
const SYNTAX: &str = "sizes are written WIDTHxHEIGHT in plain decimal digits, such as '1536x864'";

/// One edge: `Err` says why not; `Ok(None)` is an edge too long to be allowed, never parsed.
fn edge(text: &str) -> Result<Option<u32>, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SYNTAX.to_owned());
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err("sizes are written without leading zeros, such as '1536x864'".to_owned());
    }
    if text.len() > EDGE_MAX_DIGITS {
        return Ok(None);
    }
    Ok(text.parse::<u32>().ok())
}

/// `WxH` with positive plain decimal edges, for the catalog's own lists.
pub(super) fn parse(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    match (edge(w).ok()??, edge(h).ok()??) {
        (0, _) | (_, 0) => None,
        wh => Some(wh),
    }
}

impl FreeSizes {
    /// `Ok` when `size` is within the bounds; else the reason, for the caller's message.
    pub fn check(&self, size: &str) -> Result<(), String> {
        let Some((w, h)) = size.split_once('x') else { return Err(SYNTAX.to_owned()) };
        let (w, h) = (edge(w)?, edge(h)?);
        let too_long = || format!("the longest edge may be at most {} pixels", self.max_edge);
        let (Some(w), Some(h)) = (w, h) else { return Err(too_long()) };
        let m = self.multiple.max(1);
        if w == 0 || h == 0 || w % m != 0 || h % m != 0 {
            return Err(format!("width and height must both be multiples of {m}"));
        }
        let (long, short) = (u64::from(w.max(h)), u64::from(w.min(h)));
        if long > short.saturating_mul(u64::from(self.max_ratio)) {
            return Err(format!("the aspect ratio must be between 1:{r} and {r}:1", r = self.max_ratio));
        }
        if long > u64::from(self.max_edge) {
            return Err(too_long());
        }
        let pixels = u64::from(w).saturating_mul(u64::from(h));
        if !(self.min_pixels..=self.max_pixels).contains(&pixels) {
            return Err(format!(
                "the image must have between {} and {} pixels",
                thousands(self.min_pixels),
                thousands(self.max_pixels)
            ));
        }
        Ok(())
    }

    /// Why the bounds cannot be used, if they cannot.
    pub(super) fn faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        if self.multiple == 0 || self.max_ratio == 0 || self.max_edge == 0 {
            faults.push("multiple, max_ratio and max_edge must be at least 1".to_owned());
        }
        if self.max_edge >= 100_000 {
            faults.push("max_edge must be below 100000".to_owned());
        }
        if self.min_pixels > self.max_pixels {
            faults.push("min_pixels is above max_pixels".to_owned());
        }
        faults
    }
}

/// `8294400` → `8,294,400`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT_IMAGE_2: FreeSizes =
        FreeSizes { multiple: 16, max_ratio: 3, max_edge: 3840, min_pixels: 655_360, max_pixels: 8_294_400 };

    #[test]
    fn free_sizes_follow_the_bounds() {
        for ok in ["1536x864", "3840x2160", "2160x3840", "1024x1024", "1024x640", "2048x2048"] {
            assert_eq!(GPT_IMAGE_2.check(ok), Ok(()), "{ok}");
        }
        for bad in ["1000x1000", "4096x1024", "3856x2160", "512x512", "3840x2176", "0x16", "axb", "1024", "16x4800"] {
            assert!(GPT_IMAGE_2.check(bad).is_err(), "{bad}");
        }
        assert_eq!(
            GPT_IMAGE_2.check("512x512").unwrap_err(),
            "the image must have between 655,360 and 8,294,400 pixels"
        );
        assert_eq!(GPT_IMAGE_2.check("3072x768").unwrap_err(), "the aspect ratio must be between 1:3 and 3:1");
    }

    #[test]
    fn free_sizes_are_parsed_strictly_and_huge_numbers_never_overflow() {
        let huge = "18446744073709551600x18446744073709551600";
        assert_eq!(GPT_IMAGE_2.check(huge), Err("the longest edge may be at most 3840 pixels".to_owned()));
        for bad in [
            "+1024x+1024",
            "01024x1024",
            "00x1024",
            " 1024x1024",
            "1024x1024 ",
            "１０２４x1024",
            "-1024x1024",
            "1024x",
            "x1024",
            "1024x1024x16",
            "4294967296x16",
            "99999x99999",
        ] {
            assert!(GPT_IMAGE_2.check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_bounds_change_the_verdict() {
        let square_ish = FreeSizes { multiple: 64, max_ratio: 2, max_edge: 2048, min_pixels: 1, max_pixels: u64::MAX };
        assert!(square_ish.check("2048x1024").is_ok());
        assert!(square_ish.check("2048x960").unwrap_err().contains("1:2"));
        assert!(square_ish.check("1040x1040").unwrap_err().contains("multiples of 64"));
    }
}
