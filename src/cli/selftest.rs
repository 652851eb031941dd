//! `igpt selftest`: flags to [`igpt::selftest::Options`], the library's checks, the table.

use anyhow::{Context, Result, bail};
use clap::Args;
use igpt::backend::Device;
use igpt::selftest::{self, Options};
use std::path::PathBuf;

#[derive(Args)]
pub struct SelftestArgs {
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Steps of the bf16-against-f32 training run (devices that train in bf16 only).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Skip the bf16 training run (the kernels, training step and decoder still run).
    #[arg(long)]
    quick: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn selftest(a: SelftestArgs, dev: &Device) -> Result<()> {
    let options = Options {
        seed: a.seed,
        bf16_steps: (!a.quick).then_some(a.steps),
    };
    let report = selftest::run(dev, &options)?;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        std::fs::write(path, report.to_json()?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    let failed: Vec<&str> = report.failures().iter().map(|c| c.name.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "{dev} failed {} of {} self-test checks: {}",
            failed.len(),
            report.checks.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
