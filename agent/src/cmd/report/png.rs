//! SVG charts rendered to PNG with resvg, so that the PNG is exactly the SVG (same layout, same
//! text) and needs nothing from the host: the fonts are the embedded DejaVu Sans, not the system's
//! (a container or a minimal host has none).
//!
//! Why not plotters' own bitmap backend: with an embedded font it positions small glyphs up to two
//! pixels off the baseline (a full stop looks like a middle dot at axis-label sizes).

use std::sync::{Arc, OnceLock};

use resvg::{tiny_skia, usvg};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PngError {
    #[error("the chart is not valid SVG: {0}")]
    Svg(#[from] usvg::Error),
    #[error("the chart has no size")]
    Empty,
    #[error("cannot encode PNG: {0}")]
    Encode(String),
}

/// A font database holding only the embedded fonts, with DejaVu Sans as every generic family.
fn fonts() -> Arc<usvg::fontdb::Database> {
    static FONTS: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = usvg::fontdb::Database::new();
            db.load_font_data(dejavu::sans::regular().to_vec());
            db.load_font_data(dejavu::sans::bold().to_vec());
            db.set_sans_serif_family("DejaVu Sans");
            db.set_serif_family("DejaVu Sans");
            db.set_monospace_family("DejaVu Sans");
            Arc::new(db)
        })
        .clone()
}

/// Renders an SVG document to PNG bytes at its own size times `scale`.
pub fn svg_to_png(svg: &str, scale: f32) -> Result<Vec<u8>, PngError> {
    let options = usvg::Options {
        font_family: "DejaVu Sans".to_owned(),
        fontdb: fonts(),
        ..usvg::Options::default()
    };
    let tree = usvg::Tree::from_str(svg, &options)?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(scale)
        .ok_or(PngError::Empty)?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or(PngError::Empty)?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| PngError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_shapes_render_with_the_embedded_font() {
        let svg = r##"<svg xmlns="http://www.w3.org/2000/svg" width="200" height="60">
            <rect x="0" y="0" width="50" height="60" fill="#1F77B4"/>
            <text x="60" y="40" font-family="sans-serif" font-size="30">1.02µs</text></svg>"##;
        let png = svg_to_png(svg, 1.0).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let blank = svg_to_png(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="200" height="60"></svg>"#,
            1.0,
        )
        .unwrap();
        // The text adds ink: a PNG with it compresses worse than a blank one of the same size.
        assert!(
            png.len() > blank.len() + 200,
            "{} vs {}",
            png.len(),
            blank.len()
        );
        assert!(matches!(svg_to_png("<nope", 1.0), Err(PngError::Svg(_))));
    }
}
