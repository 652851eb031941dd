//! Model shape: the handful of numbers that define an Image GPT.

use serde::{Deserialize, Serialize};

/// Training objective, which also fixes how the model reads its input (REFERENCE.md §3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Next-pixel prediction: causal attention, a start token in front.
    #[default]
    Autoregressive,
    /// Masked-pixel prediction: bidirectional attention, masked positions get a zero content
    /// embedding, no start token.
    Bert,
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::Autoregressive => "autoregressive",
            Objective::Bert => "bert",
        })
    }
}

impl std::str::FromStr for Objective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "autoregressive" | "ar" => Ok(Objective::Autoregressive),
            "bert" => Ok(Objective::Bert),
            _ => anyhow::bail!("unknown objective '{s}': autoregressive or bert"),
        }
    }
}

/// Shape of an Image GPT (REFERENCE.md §3). `n_ctx` is the number of pixels per image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Palette size: the number of colours the head predicts.
    pub n_vocab: usize,
    /// Image side in pixels; the context is `side * side` tokens.
    pub side: usize,
    /// Colour channels of the palette (1 grayscale, 3 RGB).
    pub channels: usize,
    /// Absent in configs written before BERT models existed: those are autoregressive.
    #[serde(default)]
    pub objective: Objective,
}

/// Largest layer count, width and image side a configuration may name.
pub const MAX_LAYERS: usize = 4096;
pub const MAX_EMBD: usize = 1 << 16;
pub const MAX_SIDE: usize = 4096;

/// Refuses an image side no model can have: 0, or more than [`MAX_SIDE`].
pub fn check_side(side: usize) -> anyhow::Result<()> {
    anyhow::ensure!(side >= 1, "image side must be at least 1 pixel");
    anyhow::ensure!(
        side <= MAX_SIDE,
        "an image side of {side} pixels is more than the {MAX_SIDE} igpt supports"
    );
    Ok(())
}

/// Named model sizes. `tiny` is ours; `s`, `m`, `l` are OpenAI's released shapes.
pub const PRESETS: &[(&str, usize, usize, usize)] = &[
    ("tiny", 8, 256, 8),
    ("s", 24, 512, 8),
    ("m", 36, 1024, 8),
    ("l", 48, 1536, 16),
];

impl ModelConfig {
    /// A preset by name (`tiny`, `s`, `m`, `l`) for the given palette and image side.
    pub fn preset(
        name: &str,
        n_vocab: usize,
        side: usize,
        channels: usize,
    ) -> anyhow::Result<Self> {
        let (_, n_layer, n_embd, n_head) = PRESETS
            .iter()
            .find(|p| p.0 == name)
            .ok_or_else(|| {
                let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
                anyhow::anyhow!("unknown model preset '{name}': choose one of {names:?}, or give the shape itself")
            })?;
        let cfg = Self {
            n_layer: *n_layer,
            n_embd: *n_embd,
            n_head: *n_head,
            n_vocab,
            side,
            channels,
            objective: Objective::Autoregressive,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn n_ctx(&self) -> usize {
        self.side * self.side
    }

    /// Whether attention is causal (autoregressive models) or sees the whole image (BERT).
    pub fn causal(&self) -> bool {
        self.objective == Objective::Autoregressive
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Checks that the shape is one the engine can run, with a message that says how to fix it.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.n_layer >= 1,
            "the model needs at least one layer (got n_layer = 0)"
        );
        anyhow::ensure!(
            self.n_head >= 1 && self.n_embd >= 1,
            "n_embd and n_head must be positive"
        );
        anyhow::ensure!(
            self.n_embd.is_multiple_of(self.n_head),
            "n_embd ({}) must be a multiple of n_head ({})",
            self.n_embd,
            self.n_head
        );
        anyhow::ensure!(
            (2..=65536).contains(&self.n_vocab),
            "palette size must be between 2 and 65536 colours (got {})",
            self.n_vocab
        );
        check_side(self.side)?;
        // Structural limits, far beyond any model this engine can hold, that keep every size
        // computed from the shape (layouts, plans) clear of overflow; memory is checked
        // separately, before anything is allocated (`crate::memory`).
        anyhow::ensure!(
            self.n_layer <= MAX_LAYERS,
            "n_layer {} is more than the {MAX_LAYERS} layers igpt supports",
            self.n_layer
        );
        anyhow::ensure!(
            self.n_embd <= MAX_EMBD,
            "n_embd {} is more than the {MAX_EMBD} igpt supports",
            self.n_embd
        );
        anyhow::ensure!(
            self.channels == 1 || self.channels == 3,
            "images must have 1 or 3 channels (got {})",
            self.channels
        );
        Ok(())
    }

    /// Number of trainable parameters (no biases: REFERENCE.md §3).
    pub fn n_params(&self) -> usize {
        usize::try_from(crate::memory::param_count(self)).unwrap_or(usize::MAX)
    }

    /// One line for people: "4 layers, d=128, 2 heads, 784 tokens per image, 16 colours:
    /// 0.89 M parameters".
    pub fn summary(&self) -> String {
        format!(
            "{} layers, d={}, {} heads, {} tokens per image, {} colours: {:.2} M parameters",
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.n_ctx(),
            self.n_vocab,
            self.n_params() as f64 / 1e6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_sizes_have_the_published_parameter_counts() {
        // REFERENCE.md §3: 76.57 M, 455.16 M and 1362.25 M for 32x32 images and 512 colours.
        for (name, millions) in [("s", 76.57), ("m", 455.16), ("l", 1362.25)] {
            let cfg = ModelConfig::preset(name, 512, 32, 3).unwrap();
            let m = cfg.n_params() as f64 / 1e6;
            assert!((m - millions).abs() < 0.005, "{name}: {m} M");
        }
    }

    #[test]
    fn bad_shapes_are_explained() {
        let mut cfg = ModelConfig::preset("tiny", 16, 8, 1).unwrap();
        cfg.n_head = 3;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of n_head")
        );
        assert!(
            ModelConfig::preset("xxl", 16, 8, 1)
                .unwrap_err()
                .to_string()
                .contains("unknown model preset")
        );
        assert!(ModelConfig::preset("tiny", 16, 8, 2).is_err());
        // Absurd sizes are refused before anything is computed from them.
        for (field, v) in [
            ("n_layer", 1usize << 40),
            ("n_embd", 1 << 40),
            ("side", 1_000_000_000),
            // Just past each limit.
            ("n_layer", MAX_LAYERS + 1),
            ("n_embd", MAX_EMBD + 8),
            ("side", MAX_SIDE + 1),
        ] {
            let mut c = ModelConfig::preset("tiny", 16, 8, 1).unwrap();
            match field {
                "n_layer" => c.n_layer = v,
                "n_embd" => c.n_embd = v,
                _ => c.side = v,
            }
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&v.to_string()) && e.contains("igpt supports"),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn the_parameter_count_is_the_layout_s() {
        for (l, d, h, v, side) in [(1, 16, 2, 8, 6), (3, 48, 4, 17, 5), (8, 256, 8, 512, 32)] {
            let c = ModelConfig {
                n_layer: l,
                n_embd: d,
                n_head: h,
                n_vocab: v,
                side,
                channels: 1,
                objective: Objective::Autoregressive,
            };
            assert_eq!(c.n_params(), crate::model::ParamLayout::new(&c).total);
        }
    }
}
