//! The reliability diagram of `smax eval --plot`: per panel (before, and after a fitted
//! temperature), the accuracy of each confidence bin against the diagonal with the gap to the
//! bin's mean confidence, and under it the histogram of confidences. One scene (rectangles,
//! lines, text) drawn two ways: SVG text, or PNG rasterised here with a built-in 5×7 font and
//! encoded with `flate2`, so no system library is needed.

use std::path::Path;

use super::{BinRow, Report};

#[derive(Clone, Copy)]
struct Rgba(u8, u8, u8, u8);

enum Shape {
    Rect { x: f64, y: f64, w: f64, h: f64, fill: Rgba },
    Line { x0: f64, y0: f64, x1: f64, y1: f64, color: Rgba },
    Text { x: f64, y: f64, s: String, center: bool },
}

const W_PANEL: f64 = 440.0;
const H: f64 = 510.0;
const BLUE: Rgba = Rgba(52, 101, 164, 255);
const RED: Rgba = Rgba(204, 40, 40, 90);
const GREY: Rgba = Rgba(120, 120, 120, 255);
const LIGHT: Rgba = Rgba(200, 200, 200, 255);
const BLACK: Rgba = Rgba(0, 0, 0, 255);

fn panel(out: &mut Vec<Shape>, x0: f64, title: &str, r: &Report) {
    let (px, py, pw, ph) = (x0 + 60.0, 70.0, 340.0, 290.0);
    let (hy, hh) = (py + ph + 40.0, 70.0);
    out.push(Shape::Text { x: px + pw / 2.0, y: 20.0, s: title.into(), center: true });
    out.push(Shape::Text {
        x: px + pw / 2.0,
        y: 40.0,
        s: format!("T={:.3}  ECE={:.4}  ACC={:.4}", r.temperature, r.ece, r.top1),
        center: true,
    });
    let bx = |c: f64| px + c.clamp(0.0, 1.0) * pw;
    let by = |a: f64| py + ph - a.clamp(0.0, 1.0) * ph;
    let total: u64 = r.bins.iter().map(|b| b.count).sum();
    let peak = r.bins.iter().map(|b| b.count).max().unwrap_or(0).max(1) as f64;
    for b in r.bins.iter().filter(|b| b.count > 0) {
        let BinRow { lo, hi, accuracy, confidence, count } = *b;
        let (x, w) = (bx(lo), (bx(hi) - bx(lo)).max(1.0));
        out.push(Shape::Rect { x, y: by(accuracy), w, h: by(0.0) - by(accuracy), fill: BLUE });
        let (a, c) = (by(accuracy), by(confidence));
        out.push(Shape::Rect { x, y: a.min(c), w, h: (a - c).abs().max(1.0), fill: RED });
        let hgt = count as f64 / peak * hh;
        out.push(Shape::Rect { x, y: hy + hh - hgt, w, h: hgt, fill: GREY });
    }
    // Axes, diagonal, ticks.
    for (x0, y0, x1, y1) in
        [(px, py, px, py + ph), (px, py + ph, px + pw, py + ph), (px, hy + hh, px + pw, hy + hh), (px, hy, px, hy + hh)]
    {
        out.push(Shape::Line { x0, y0, x1, y1, color: BLACK });
    }
    out.push(Shape::Line { x0: bx(0.0), y0: by(0.0), x1: bx(1.0), y1: by(1.0), color: LIGHT });
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        out.push(Shape::Line { x0: bx(t), y0: py + ph, x1: bx(t), y1: py + ph + 5.0, color: BLACK });
        out.push(Shape::Text { x: bx(t), y: py + ph + 20.0, s: format!("{t}"), center: true });
        out.push(Shape::Line { x0: px - 5.0, y0: by(t), x1: px, y1: by(t), color: BLACK });
        out.push(Shape::Text { x: px - 42.0, y: by(t) + 5.0, s: format!("{t:.2}"), center: false });
    }
    out.push(Shape::Text { x: px - 55.0, y: py - 10.0, s: "ACCURACY".into(), center: false });
    out.push(Shape::Text { x: px + pw / 2.0, y: hy + hh + 22.0, s: "CONFIDENCE".into(), center: true });
    out.push(Shape::Text { x: px + pw - 2.0, y: hy - 6.0, s: format!("N={total}"), center: true });
}

fn scene(before: &Report, after: Option<&Report>) -> (f64, Vec<Shape>) {
    let mut s = Vec::new();
    panel(&mut s, 0.0, "BEFORE", before);
    if let Some(a) = after {
        panel(&mut s, W_PANEL, "AFTER TEMPERATURE SCALING", a);
    }
    (if after.is_some() { 2.0 * W_PANEL } else { W_PANEL }, s)
}

/// Writes the diagram to `path` (`.svg` or `.png`, by extension).
pub fn reliability(path: &Path, before: &Report, after: Option<&Report>) -> Result<(), String> {
    let (w, shapes) = scene(before, after);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let bytes = match ext.as_str() {
        "svg" => svg(w, &shapes).into_bytes(),
        "png" => png(w as usize, H as usize, &shapes)?,
        _ => return Err("--plot: the file must end in .svg or .png".into()),
    };
    std::fs::write(path, bytes).map_err(|e| e.to_string())
}

fn svg(w: f64, shapes: &[Shape]) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{H}\" viewBox=\"0 0 {w} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let col = |c: Rgba| format!("rgb({},{},{})\" fill-opacity=\"{:.3}", c.0, c.1, c.2, c.3 as f64 / 255.0);
    for sh in shapes {
        match sh {
            Shape::Rect { x, y, w, h, fill } => {
                s += &format!(
                    "<rect x=\"{x:.2}\" y=\"{y:.2}\" width=\"{w:.2}\" height=\"{h:.2}\" fill=\"{}\"/>\n",
                    col(*fill)
                )
            }
            Shape::Line { x0, y0, x1, y1, color } => {
                s += &format!(
                    "<line x1=\"{x0:.2}\" y1=\"{y0:.2}\" x2=\"{x1:.2}\" y2=\"{y1:.2}\" stroke=\"rgb({},{},{})\"/>\n",
                    color.0, color.1, color.2
                )
            }
            Shape::Text { x, y, s: t, center } => {
                let anchor = if *center { " text-anchor=\"middle\"" } else { "" };
                let t = t.replace('&', "&amp;").replace('<', "&lt;");
                s += &format!("<text x=\"{x:.2}\" y=\"{y:.2}\"{anchor}>{t}</text>\n");
            }
        }
    }
    s + "</svg>\n"
}

/// 5×7 glyphs, one byte per row (bit 4 = leftmost column); lower case draws as upper case.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn blend(&mut self, x: i64, y: i64, c: Rgba) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let p = &mut self.px[y as usize * self.w + x as usize];
        let a = c.3 as u32;
        for (d, s) in p.iter_mut().zip([c.0, c.1, c.2]) {
            *d = ((s as u32 * a + *d as u32 * (255 - a)) / 255) as u8;
        }
    }
}

/// Text at scale 2: 10×14-pixel glyphs on a 12-pixel advance; `y` is the baseline.
fn text_px(cv: &mut Canvas, x: f64, y: f64, s: &str, center: bool) {
    let adv = 12.0;
    let x0 = if center { x - adv * s.chars().count() as f64 / 2.0 } else { x };
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        let gx = (x0 + i as f64 * adv).round() as i64;
        let gy = (y - 14.0).round() as i64;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        cv.blend(gx + 2 * col + dx, gy + 2 * row as i64 + dy, BLACK);
                    }
                }
            }
        }
    }
}

fn png(w: usize, h: usize, shapes: &[Shape]) -> Result<Vec<u8>, String> {
    let mut cv = Canvas { w, h, px: vec![[255, 255, 255]; w * h] };
    for sh in shapes {
        match sh {
            Shape::Rect { x, y, w, h, fill } => {
                let (x0, y0) = (x.round() as i64, y.round() as i64);
                let (x1, y1) = ((x + w).round() as i64, (y + h).round() as i64);
                for yy in y0..y1.max(y0 + 1) {
                    for xx in x0..x1.max(x0 + 1) {
                        cv.blend(xx, yy, *fill);
                    }
                }
            }
            Shape::Line { x0, y0, x1, y1, color } => {
                let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
                for i in 0..=n {
                    let t = i as f64 / n as f64;
                    cv.blend((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64, *color);
                }
            }
            Shape::Text { x, y, s, center } => text_px(&mut cv, *x, *y, s, *center),
        }
    }
    // PNG: signature, IHDR (8-bit RGB), one zlib IDAT of filter-0 scanlines, IEND.
    let mut raw = Vec::with_capacity(h * (3 * w + 1));
    for row in cv.px.chunks(w) {
        raw.push(0);
        raw.extend(row.iter().flatten());
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &raw).map_err(|e| e.to_string())?;
    let idat = z.finish().map_err(|e| e.to_string())?;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &idat);
    chunk(b"IEND", &[]);
    Ok(out)
}
