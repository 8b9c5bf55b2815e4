//! The benchmark's curves: SVG line charts drawn with plotters (no font or system library
//! needed: text stays text in the SVG), one panel per measure above a shared x axis on a log
//! scale, for docs/curves/.

use std::path::Path;

use plotters::prelude::*;

/// One line of a panel: its legend and its points (x, y).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// A measure drawn against the shared x axis: what its y axis is, and its lines.
pub struct Panel {
    pub y_desc: String,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Draws `panels`, one above the other, against `x_desc` on a log scale, titled `title`, into
/// the SVG file `path`. Each panel's y axis starts at 0 and ends a little above its largest y.
pub fn draw(
    path: &Path,
    title: &str,
    x_desc: &str,
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error>> {
    let height = 60 + 300 * panels.len() as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let xs = panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| &s.points)
        .map(|(x, _)| *x);
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let x_range = (x_min.max(1e-9) * 0.8)..(x_max * 1.25);
    for (panel, area) in panels.iter().zip(root.split_evenly((panels.len(), 1))) {
        let y_max = panel
            .series
            .iter()
            .flat_map(|s| &s.points)
            .map(|(_, y)| *y)
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone().log_scale(), 0.0..(y_max * 1.15).max(1e-9))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(panel.y_desc.as_str())
            .draw()?;
        for (series, color) in panel.series.iter().zip(COLORS.iter().cycle()) {
            let color = *color;
            chart
                .draw_series(LineSeries::new(series.points.iter().copied(), color))?
                .label(series.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                series
                    .points
                    .iter()
                    .map(|point| Circle::new(*point, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
