//! Fast, deterministic placeholder images for the mock upstream: a seed picks colours and shapes, the pixels are
//! built row by row and encoded as PNG, JPEG or lossless WebP, with a small in-process cache of recent results.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use image::ExtendedColorType;
use image::ImageEncoder as _;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use sha2::{Digest as _, Sha256};

/// Largest width or height rendered (and accepted by [`parse_size`]).
pub const MAX_EDGE: u32 = 4096;

/// Cached renders kept at most.
const CACHE_ENTRIES: usize = 64;
/// Total encoded bytes kept in the cache at most.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Renders larger than this are never cached.
const CACHE_MAX_ITEM: usize = 8 * 1024 * 1024;

/// An image encoding, spelt as OpenAI's `output_format` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    /// `png`, `jpeg` or `webp` (OpenAI's spelling: `jpg` is not accepted).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "png" => Some(Self::Png),
            "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }

    /// The name as OpenAI writes it in `output_format`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The file extension, without the dot; round-trips through [`OutputFormat::parse`].
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    /// Whether the encoding carries an alpha channel.
    pub fn supports_alpha(self) -> bool {
        !matches!(self, Self::Jpeg)
    }
}

/// A stable seed for image `index` of a prompt: the first 8 bytes of `sha256(prompt || index)`.
pub fn seed_for(prompt: &str, index: u32) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(prompt.as_bytes());
    hasher.update([0u8]);
    hasher.update(index.to_be_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Parse `WxH` (e.g. `1024x1536`). Both edges must be in `1..=MAX_EDGE`.
pub fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let parse = |t: &str| -> Option<u32> {
        if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse::<u32>().ok().filter(|v| (1..=MAX_EDGE).contains(v))
    };
    Some((parse(w)?, parse(h)?))
}

/// Render an opaque `width`×`height` image for `seed`, encoded as `format`.
pub fn render(seed: u64, width: u32, height: u32, format: OutputFormat) -> anyhow::Result<Bytes> {
    render_with_background(seed, width, height, format, false)
}

/// Like [`render`]; with `transparent` (and a format that has alpha) the background is fully transparent.
pub fn render_with_background(
    seed: u64,
    width: u32,
    height: u32,
    format: OutputFormat,
    transparent: bool,
) -> anyhow::Result<Bytes> {
    anyhow::ensure!(
        (1..=MAX_EDGE).contains(&width) && (1..=MAX_EDGE).contains(&height),
        "image size {width}x{height} out of range (1..={MAX_EDGE})"
    );
    let transparent = transparent && format.supports_alpha();
    let key = Key { seed, width, height, format, transparent };
    if let Some(hit) = cache_get(&key) {
        return Ok(hit);
    }
    let bytes = encode(&key)?;
    cache_put(key, bytes.clone());
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    seed: u64,
    width: u32,
    height: u32,
    format: OutputFormat,
    transparent: bool,
}

fn encode(key: &Key) -> anyhow::Result<Bytes> {
    let (w, h) = (key.width, key.height);
    let pixels = paint(key.seed, w, h, key.transparent);
    let color = if key.transparent { ExtendedColorType::Rgba8 } else { ExtendedColorType::Rgb8 };
    let mut out = Vec::with_capacity(64 * 1024);
    match key.format {
        OutputFormat::Png => PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
            .write_image(&pixels, w, h, color)
            .context("encoding PNG")?,
        OutputFormat::Jpeg => {
            JpegEncoder::new_with_quality(&mut out, 85).write_image(&pixels, w, h, color).context("encoding JPEG")?
        }
        OutputFormat::Webp => {
            WebPEncoder::new_lossless(&mut out).write_image(&pixels, w, h, color).context("encoding WebP")?
        }
    }
    Ok(Bytes::from(out))
}

/// splitmix64: a tiny, well-mixed deterministic generator.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A saturated colour of hue `hue` (0..1) and the given lightness (0..1).
    fn colour(hue: f64, light: f64) -> [u8; 3] {
        // HSL with saturation 0.65.
        let s = 0.65;
        let c = (1.0 - (2.0 * light - 1.0).abs()) * s;
        let hp = (hue.rem_euclid(1.0)) * 6.0;
        let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
        let (r, g, b) = match hp as u32 {
            0 => (c, x, 0.0),
            1 => (x, c, 0.0),
            2 => (0.0, c, x),
            3 => (0.0, x, c),
            4 => (x, 0.0, c),
            _ => (c, 0.0, x),
        };
        let m = light - c / 2.0;
        let to = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
        [to(r), to(g), to(b)]
    }
}

/// Fill a clamped span `[from, to)` of a row with the matching span of a solid template row.
fn fill_span(row: &mut [u8], template: &[u8], from: f64, to: f64, width: u32, bpp: usize) {
    let w = f64::from(width);
    let a = from.clamp(0.0, w) as usize;
    let b = to.clamp(0.0, w) as usize;
    if a < b {
        row[a * bpp..b * bpp].copy_from_slice(&template[a * bpp..b * bpp]);
    }
}

/// The raw pixels (RGB, or RGBA when `transparent`): a background, horizontal stripes, a diagonal band and a
/// disc, each placed and coloured from `seed`. Built a row at a time from solid template rows.
fn paint(seed: u64, width: u32, height: u32, transparent: bool) -> Vec<u8> {
    let mut rng = Mix(seed);
    let hue = rng.unit();
    let bg = Mix::colour(hue, 0.25 + 0.2 * rng.unit());
    let stripe = Mix::colour(hue + 0.08, 0.35 + 0.2 * rng.unit());
    let band = Mix::colour(hue + 0.5, 0.55 + 0.2 * rng.unit());
    let disc = Mix::colour(hue + 0.25 + 0.25 * rng.unit(), 0.6 + 0.25 * rng.unit());

    let (w, h) = (f64::from(width), f64::from(height));
    let stripe_period = (h / (4.0 + (rng.next() % 12) as f64)).max(2.0);
    let stripe_on = stripe_period * (0.2 + 0.3 * rng.unit());
    let band_x0 = w * rng.unit();
    let band_slope = (rng.unit() - 0.5) * 3.0 * w / h.max(1.0);
    let band_half = w * (0.05 + 0.12 * rng.unit());
    let disc_cx = w * (0.2 + 0.6 * rng.unit());
    let disc_cy = h * (0.2 + 0.6 * rng.unit());
    let disc_r = w.min(h) * (0.12 + 0.25 * rng.unit());

    let bpp = if transparent { 4 } else { 3 };
    let solid = |rgb: [u8; 3], alpha: u8| -> Vec<u8> {
        let px: &[u8] = if transparent { &[rgb[0], rgb[1], rgb[2], alpha] } else { &rgb };
        px.repeat(width as usize)
    };
    let bg_row = solid(bg, 0);
    let stripe_row = solid(stripe, 255);
    let band_row = solid(band, 255);
    let disc_row = solid(disc, 255);

    let stride = width as usize * bpp;
    let mut pixels = vec![0u8; stride * height as usize];
    for (y, row) in pixels.chunks_exact_mut(stride).enumerate() {
        let yf = y as f64 + 0.5;
        if yf % stripe_period < stripe_on {
            row.copy_from_slice(&stripe_row);
        } else {
            row.copy_from_slice(&bg_row);
        }
        let centre = band_x0 + band_slope * yf;
        fill_span(row, &band_row, centre - band_half, centre + band_half, width, bpp);
        let dy = yf - disc_cy;
        if dy.abs() < disc_r {
            let dx = (disc_r * disc_r - dy * dy).sqrt();
            fill_span(row, &disc_row, disc_cx - dx, disc_cx + dx, width, bpp);
        }
    }
    pixels
}

/// Insertion-ordered cache bounded by entry count and total bytes (oldest evicted first).
#[derive(Default)]
struct Cache {
    map: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    bytes: usize,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(|| Mutex::new(Cache::default()));

fn cache_get(key: &Key) -> Option<Bytes> {
    let cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    cache.map.get(key).cloned()
}

fn cache_put(key: Key, value: Bytes) {
    if value.len() > CACHE_MAX_ITEM {
        return;
    }
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.map.contains_key(&key) {
        return;
    }
    while cache.map.len() >= CACHE_ENTRIES || cache.bytes + value.len() > CACHE_BYTES {
        let Some(old) = cache.order.pop_front() else { break };
        if let Some(v) = cache.map.remove(&old) {
            cache.bytes -= v.len();
        }
    }
    cache.bytes += value.len();
    cache.order.push_back(key);
    cache.map.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> image::DynamicImage {
        image::load_from_memory(bytes).expect("decodable image")
    }

    #[test]
    fn renders_decodable_images_of_the_right_size_in_every_format() {
        for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            for (w, h) in [(1024, 1024), (1536, 1024), (256, 256), (1, 1), (17, 3)] {
                let bytes = render(7, w, h, format).unwrap();
                let guessed = image::guess_format(&bytes).unwrap();
                let expected = match format {
                    OutputFormat::Png => image::ImageFormat::Png,
                    OutputFormat::Jpeg => image::ImageFormat::Jpeg,
                    OutputFormat::Webp => image::ImageFormat::WebP,
                };
                assert_eq!(guessed, expected);
                let img = decode(&bytes);
                assert_eq!((img.width(), img.height()), (w, h), "{format:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn rendering_is_deterministic_and_seed_dependent() {
        // Bypass the cache so determinism is about the pixels, not the memo.
        let key = |seed| Key { seed, width: 320, height: 200, format: OutputFormat::Png, transparent: false };
        let a1 = encode(&key(1)).unwrap();
        let a2 = encode(&key(1)).unwrap();
        let b = encode(&key(2)).unwrap();
        assert_eq!(a1, a2);
        assert_ne!(decode(&a1).to_rgb8().into_raw(), decode(&b).to_rgb8().into_raw());
        assert_eq!(render(1, 320, 200, OutputFormat::Png).unwrap(), a1);
    }

    #[test]
    fn images_are_not_blank() {
        let img = decode(&render(42, 256, 256, OutputFormat::Png).unwrap()).to_rgb8();
        let first = *img.get_pixel(0, 0);
        let distinct = img.pixels().filter(|p| **p != first).count();
        assert!(distinct > 256 * 256 / 50, "only {distinct} pixels differ from the background");
    }

    #[test]
    fn transparent_background_has_alpha_zero_corners_and_opaque_shapes() {
        let img = decode(&render_with_background(3, 128, 128, OutputFormat::Png, true).unwrap()).to_rgba8();
        let alphas: Vec<u8> = img.pixels().map(|p| p.0[3]).collect();
        assert!(alphas.contains(&0));
        assert!(alphas.contains(&255));
        let webp = decode(&render_with_background(3, 64, 32, OutputFormat::Webp, true).unwrap());
        assert!(webp.color().has_alpha());
        // JPEG has no alpha: the request still succeeds, opaque.
        let jpeg = decode(&render_with_background(3, 64, 32, OutputFormat::Jpeg, true).unwrap());
        assert_eq!((jpeg.width(), jpeg.height()), (64, 32));
    }

    #[test]
    fn out_of_range_sizes_are_errors_not_panics() {
        assert!(render(1, 0, 10, OutputFormat::Png).is_err());
        assert!(render(1, MAX_EDGE + 1, 10, OutputFormat::Png).is_err());
    }

    #[test]
    fn output_format_round_trips() {
        for f in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            assert_eq!(OutputFormat::parse(f.extension()), Some(f));
            assert_eq!(OutputFormat::parse(f.as_str()), Some(f));
            assert!(f.mime().starts_with("image/"));
        }
        assert_eq!(OutputFormat::parse("jpg"), None);
        assert_eq!(OutputFormat::parse("PNG"), None);
    }

    #[test]
    fn seeds_are_stable_and_index_dependent() {
        assert_eq!(seed_for("a cat", 0), seed_for("a cat", 0));
        assert_ne!(seed_for("a cat", 0), seed_for("a cat", 1));
        assert_ne!(seed_for("a cat", 0), seed_for("a dog", 0));
        // Pinned so seeds (and therefore mock URLs) stay stable across releases.
        assert_eq!(seed_for("a cat", 0), 0x0d91_b5c3_4251_4363);
    }

    #[test]
    fn sizes_parse_within_bounds() {
        assert_eq!(parse_size("1024x1536"), Some((1024, 1536)));
        assert_eq!(parse_size("1x4096"), Some((1, 4096)));
        for bad in
            ["", "auto", "1024", "0x10", "10x0", "4097x10", "x10", "10x", "-1x10", "+5x5", "1024X1024", "99999999999x1"]
        {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_stays_bounded() {
        for seed in 0..(CACHE_ENTRIES as u64 + 10) {
            render(seed ^ 0xABCD_0000, 8, 8, OutputFormat::Png).unwrap();
        }
        let cache = CACHE.lock().unwrap();
        assert!(cache.map.len() <= CACHE_ENTRIES);
        assert_eq!(cache.map.len(), cache.order.len());
        assert!(cache.bytes <= CACHE_BYTES);
    }
}
