//! `gpo model-info`: the module's configuration, parameter names and shapes, and count.

use anyhow::Result;
use gpo_core::model::GpoConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Embedding width.
    #[arg(long, default_value_t = 4096)]
    pub dim_x: usize,
    /// Transformer width.
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    /// Encoder layers.
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Feed-forward width.
    #[arg(long, default_value_t = 128)]
    pub ffn: usize,
    /// Embedder MLP depth.
    #[arg(long, default_value_t = 4)]
    pub emb_depth: usize,
    /// Also list every parameter tensor.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = GpoConfig {
        dim_x: a.dim_x,
        d_model: a.d_model,
        num_layers: a.layers,
        nhead: a.heads,
        dim_feedforward: a.ffn,
        emb_depth: a.emb_depth,
        ..Default::default()
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    println!(
        "GPO: embedder MLP depth {} over [x; y] ({} + 1) -> {}, {} post-LN encoder layers ({} heads, FFN {}), predictor -> (mean, log std)",
        cfg.emb_depth, cfg.dim_x, cfg.d_model, cfg.num_layers, cfg.nhead, cfg.dim_feedforward
    );
    if a.verbose {
        for (n, s) in cfg.param_shapes() {
            println!("  {n} {s:?}");
        }
    }
    println!("parameters: {}", cfg.param_count());
    Ok(())
}
