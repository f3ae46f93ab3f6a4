//! `bench-chart RATIOS.json OUT.png`: a grouped bar chart of how many times
//! faster (or smaller) each tool is than restic, one group per measure.
//! bench/run writes the JSON; the font comes from Debian's fonts-dejavu-core
//! (or BENCH_CHART_FONT), which bench/install-peers installs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Chart {
    title: String,
    /// One group of bars each, e.g. "first backup".
    measures: Vec<String>,
    tools: Vec<Tool>,
}

#[derive(Debug, Deserialize)]
struct Tool {
    name: String,
    /// restic's figure over this tool's, per measure (null: not measured).
    ratios: Vec<Option<f64>>,
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: bench-chart RATIOS.json OUT.png");
    };
    let chart: Chart =
        serde_json::from_slice(&std::fs::read(input).with_context(|| format!("failed to read {input}"))?)
            .with_context(|| format!("{input} is not a chart description"))?;
    if chart.tools.iter().any(|t| t.ratios.len() != chart.measures.len()) {
        bail!(
            "every tool needs one ratio per measure ({})",
            chart.measures.len()
        );
    }
    let font_path = std::env::var("BENCH_CHART_FONT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| FONT.into());
    let font = std::fs::read(&font_path).with_context(|| {
        format!(
            "failed to read the font {} (apt-get install fonts-dejavu-core, or set BENCH_CHART_FONT)",
            font_path.display()
        )
    })?;
    // The bytes must outlive the process's drawing; leaking one font is fine.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("the font file is not a usable TrueType font"))?;
    draw(&chart, output).map_err(|e| anyhow::anyhow!("failed to draw {output}: {e}"))
}

fn draw(chart: &Chart, output: &str) -> Result<(), Box<dyn std::error::Error>> {
    let groups = chart.measures.len();
    let per_group = chart.tools.len().max(1);
    let top = chart
        .tools
        .iter()
        .flat_map(|t| t.ratios.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b))
        * 1.15;
    let root = BitMapBackend::new(output, (1200, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, 0f64..top)?;
    let measures = chart.measures.clone();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            // Label each group once, at its middle.
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                measures.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("times better than restic (higher is better)")
        .label_style(("sans-serif", 16))
        .draw()?;
    // restic itself is the line at 1.
    c.draw_series(std::iter::once(PathElement::new(
        [(0.0, 1.0), (groups as f64, 1.0)],
        BLACK.stroke_width(2),
    )))?
    .label("restic = 1")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let width = 0.8 / per_group as f64;
    for (ti, tool) in chart.tools.iter().enumerate() {
        let color = COLORS[ti % COLORS.len()];
        let bars = tool.ratios.iter().enumerate().filter_map(|(g, r)| {
            let r = (*r)?;
            let x0 = g as f64 + 0.1 + ti as f64 * width;
            Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, r)], color.filled()))
        });
        c.draw_series(bars)?
            .label(&tool.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels = tool.ratios.iter().enumerate().filter_map(|(g, r)| {
            let r = (*r)?;
            let x0 = g as f64 + 0.1 + ti as f64 * width;
            Some(Text::new(
                format!("{r:.1}"),
                (x0, r + top * 0.01),
                ("sans-serif", 13),
            ))
        });
        c.draw_series(labels)?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
