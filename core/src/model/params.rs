//! The GPO module's configuration and parameters, named and shaped exactly as the official
//! PyTorch `state_dict` (`embedder.0.weight`, `encoder.layers.0.self_attn.in_proj_weight`,
//! …), so checkpoints move between the two implementations.

use crate::rng::Rng;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Sizes of the GPO module. Defaults are the paper's (TNP-D) except `dim_x`, which is the
/// embedder's width and must be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpoConfig {
    /// Width of x, the LLM embedding.
    pub dim_x: usize,
    /// Width of y (1: one probability per option point).
    pub dim_y: usize,
    /// Transformer width.
    pub d_model: usize,
    /// Layers of the point embedder MLP (≥ 2).
    pub emb_depth: usize,
    /// Feed-forward width of each encoder layer and of the predictor's hidden layer.
    pub dim_feedforward: usize,
    /// Attention heads (must divide `d_model`).
    pub nhead: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
    /// Which form of the module: the official one (`faithful`, the default and the
    /// reference), or a variant that reads the population prior ([`Variant`]).
    pub variant: Variant,
}

/// Forms of the GPO module. Every variant but `faithful` reads the *population prior* of
/// each point: its option's probability under the meta-training groups' mean answer to the
/// question ([`crate::prior::Prior`]), which on survey data is a strong baseline of its own
/// (`train_mean`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The official module (TNP-D as GPO trains it).
    #[default]
    Faithful,
    /// The prior as one more input column of every point: the embedder reads
    /// `[x; y; prior]` (targets: `[x; 0; prior]`).
    PriorInput,
    /// The means predict a deviation from the prior in logit space: `log prior` is added to
    /// each predicted mean before the per-question softmax, so a zero output predicts the prior.
    PriorLogit,
    /// `prior_logit`, and context points carry their residual `y − prior` as y: the model
    /// sees how the group departs from the population, not its raw answers.
    Residual,
    /// `residual` with the prior as an input column too (`prior_input`): every point reads
    /// its prior, context points their residual, and the means depart from the prior.
    ResidualInput,
}

impl Variant {
    /// Every variant, in the order reports list them.
    pub const ALL: [Variant; 5] = [
        Variant::Faithful,
        Variant::PriorInput,
        Variant::PriorLogit,
        Variant::Residual,
        Variant::ResidualInput,
    ];

    /// The name in configuration files and reports (`gpo+<name>` as a method).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Faithful => "faithful",
            Variant::PriorInput => "prior_input",
            Variant::PriorLogit => "prior_logit",
            Variant::Residual => "residual",
            Variant::ResidualInput => "residual_input",
        }
    }

    /// Whether batches must carry the population prior.
    pub fn reads_prior(self) -> bool {
        self != Variant::Faithful
    }

    /// Input columns beyond `[x; y]`.
    pub fn extra_inputs(self) -> usize {
        usize::from(matches!(self, Variant::PriorInput | Variant::ResidualInput))
    }

    /// Whether `log prior` is added to the predicted means.
    pub fn logit_offset(self) -> bool {
        matches!(
            self,
            Variant::PriorLogit | Variant::Residual | Variant::ResidualInput
        )
    }

    /// Whether context points carry `y − prior`.
    pub fn residual_context(self) -> bool {
        matches!(self, Variant::Residual | Variant::ResidualInput)
    }

    /// The method name of this variant's GPO in results (`gpo`, or `gpo+<name>`).
    pub fn method(self) -> String {
        match self {
            Variant::Faithful => "gpo".into(),
            v => format!("gpo+{}", v.name()),
        }
    }
}

impl Default for GpoConfig {
    fn default() -> Self {
        GpoConfig {
            dim_x: 4096,
            dim_y: 1,
            d_model: 128,
            emb_depth: 4,
            dim_feedforward: 128,
            nhead: 4,
            num_layers: 6,
            layer_norm_eps: 1e-5,
            variant: Variant::Faithful,
        }
    }
}

impl GpoConfig {
    /// The official configuration for an embedder of width `dim_x`.
    pub fn official(dim_x: usize) -> Self {
        GpoConfig {
            dim_x,
            ..Default::default()
        }
    }

    /// Rejects sizes the module cannot be built with.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dim_x == 0 || self.d_model == 0 || self.dim_feedforward == 0 {
            return Err("dim_x, d_model and dim_feedforward must be positive".into());
        }
        if self.dim_y != 1 {
            return Err(format!(
                "dim_y must be 1 (one probability per option), got {}",
                self.dim_y
            ));
        }
        if self.emb_depth < 2 {
            return Err(format!(
                "emb_depth must be at least 2, got {}",
                self.emb_depth
            ));
        }
        if self.nhead == 0 || !self.d_model.is_multiple_of(self.nhead) {
            return Err(format!(
                "nhead {} must divide d_model {}",
                self.nhead, self.d_model
            ));
        }
        if self.num_layers == 0 {
            return Err("num_layers must be at least 1".into());
        }
        Ok(())
    }

    /// Every parameter's official name and shape, in `state_dict` order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.d_model, self.dim_feedforward);
        let mut v = Vec::new();
        let lin = |v: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize| {
            v.push((format!("{name}.weight"), vec![o, i]));
            v.push((format!("{name}.bias"), vec![o]));
        };
        lin(
            &mut v,
            "embedder.0".into(),
            d,
            self.dim_x + self.dim_y + self.variant.extra_inputs(),
        );
        for k in 1..self.emb_depth {
            lin(&mut v, format!("embedder.{}", 2 * k), d, d);
        }
        for l in 0..self.num_layers {
            let p = format!("encoder.layers.{l}");
            v.push((format!("{p}.self_attn.in_proj_weight"), vec![3 * d, d]));
            v.push((format!("{p}.self_attn.in_proj_bias"), vec![3 * d]));
            lin(&mut v, format!("{p}.self_attn.out_proj"), d, d);
            lin(&mut v, format!("{p}.linear1"), f, d);
            lin(&mut v, format!("{p}.linear2"), d, f);
            for n in ["norm1", "norm2"] {
                v.push((format!("{p}.{n}.weight"), vec![d]));
                v.push((format!("{p}.{n}.bias"), vec![d]));
            }
        }
        lin(&mut v, "predictor.0".into(), f, d);
        lin(&mut v, "predictor.2".into(), 2 * self.dim_y, f);
        v
    }

    /// Total number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The module's parameters as trainable candle variables, in `state_dict` order.
#[derive(Debug, Clone)]
pub struct Params {
    entries: Vec<(String, Var)>,
}

impl Params {
    /// PyTorch's default initialization, drawn from `seed`: Linear weights and biases
    /// U(±1/√fan_in); attention in_proj Xavier-uniform with zero bias; out_proj bias zero;
    /// LayerNorm γ = 1, β = 0.
    pub fn init(cfg: &GpoConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::keyed(&[seed, 0x1417]);
        let mut entries = Vec::new();
        let mut fan_in = 1usize;
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("in_proj_weight") {
                let bound = (6.0 / (shape[0] + shape[1]) as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.f64() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            } else if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") {
                vec![0.0; n]
            } else if name.contains(".norm") {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                if name.ends_with("weight") {
                    fan_in = shape[1];
                }
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.f64() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            let mut data = data;
            if cfg.variant.logit_offset() && name.starts_with("predictor.2.") {
                // The means' row starts at zero: a variant that predicts a deviation from
                // the prior starts as the prior itself, and learns only what helps.
                let row = if name.ends_with("weight") {
                    shape[1]
                } else {
                    1
                };
                data[..row].fill(0.0);
            }
            let t = Tensor::from_vec(data, shape.as_slice(), device)?;
            entries.push((name, Var::from_tensor(&t)?));
        }
        Ok(Params { entries })
    }

    /// Parameters from named tensors (a checkpoint or an official state_dict export).
    /// Every expected name must be present with its exact shape; extra names are an error.
    pub fn from_named(
        cfg: &GpoConfig,
        mut named: std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<Self, String> {
        let mut entries = Vec::new();
        for (name, shape) in cfg.param_shapes() {
            let t = named
                .remove(&name)
                .ok_or_else(|| format!("missing parameter `{name}` (expected shape {shape:?})"))?;
            if t.dims() != shape.as_slice() {
                return Err(format!(
                    "parameter `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ));
            }
            let t = t
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| e.to_string())?;
            entries.push((name, Var::from_tensor(&t).map_err(|e| e.to_string())?));
        }
        if let Some(extra) = named.keys().min() {
            return Err(format!(
                "unexpected parameter `{extra}` for this configuration"
            ));
        }
        Ok(Params { entries })
    }

    /// Infers a configuration from an official state_dict's shapes. The head count cannot
    /// be read off shapes, so it is passed in.
    pub fn infer_config(
        named: &std::collections::HashMap<String, Tensor>,
        nhead: usize,
    ) -> std::result::Result<GpoConfig, String> {
        let dims = |n: &str| {
            named
                .get(n)
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| format!("missing parameter `{n}`"))
        };
        let e0 = dims("embedder.0.weight")?;
        let l1 = dims("encoder.layers.0.linear1.weight")?;
        let p2 = dims("predictor.2.weight")?;
        // Count layers by any tensor of theirs, so a missing weight is reported as missing
        // rather than shifting the count.
        let emb_depth = (0..)
            .take_while(|k| {
                ["weight", "bias"]
                    .iter()
                    .any(|s| named.contains_key(&format!("embedder.{}.{s}", 2 * k)))
            })
            .count();
        let num_layers = (0..)
            .take_while(|l| {
                let p = format!("encoder.layers.{l}.");
                named.keys().any(|n| n.starts_with(&p))
            })
            .count();
        let dim_y = p2[0] / 2;
        Ok(GpoConfig {
            dim_x: e0[1] - dim_y,
            dim_y,
            d_model: e0[0],
            emb_depth,
            dim_feedforward: l1[0],
            nhead,
            num_layers,
            layer_norm_eps: 1e-5,
            variant: Variant::Faithful,
        })
    }

    /// The variable of a parameter by official name.
    pub fn get(&self, name: &str) -> &Var {
        // Names are produced from the same config that built the module; a miss is a bug.
        match self.entries.iter().find(|(n, _)| n == name) {
            Some((_, v)) => v,
            None => panic!("GPO module has no parameter `{name}`"),
        }
    }

    /// All (name, variable) pairs in `state_dict` order.
    pub fn entries(&self) -> &[(String, Var)] {
        &self.entries
    }

    /// Total scalar count.
    pub fn count(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// All parameters flattened into one vector, in `state_dict` order.
    pub fn flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.count());
        for (_, v) in &self.entries {
            // Host f32 parameters (every module the trainer steps) are read straight from
            // their storage, one copy; anything else through candle's conversion.
            match host_f32(v.as_tensor(), |s| out.extend_from_slice(s)) {
                Some(()) => {}
                None => out.extend(v.flatten_all()?.to_vec1::<f32>()?),
            }
        }
        Ok(out)
    }

    /// Overwrites all parameters from one flat vector in `state_dict` order.
    ///
    /// Host f32 parameters are overwritten in place, one copy and no allocation: the
    /// trainer does this after every step, and building a tensor per parameter to copy
    /// from made it 0.53 ms a step against 0.30 ms at the official shape (issue 16).
    pub fn set_flat(&self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.count() {
            candle_core::bail!(
                "flat parameter buffer has {} values, expected {}",
                flat.len(),
                self.count()
            );
        }
        let mut off = 0;
        for (_, v) in &self.entries {
            let n = v.elem_count();
            let src = &flat[off..off + n];
            if v.device().is_cpu() && v.dtype() == candle_core::DType::F32 {
                v.as_tensor().inplace_op1(&CopyFrom(src))?;
            } else {
                v.set(&Tensor::from_slice(src, v.shape(), v.device())?)?;
            }
            off += n;
        }
        Ok(())
    }

    /// A copy with every parameter converted to `dtype` (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<Self> {
        let entries = self
            .entries
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Params { entries })
    }

    /// Named tensors (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
}

/// `f` of a host f32 tensor's values in order, read in place (`None` for any other tensor:
/// on a device, of another type, or not contiguous).
fn host_f32(t: &Tensor, f: impl FnOnce(&[f32])) -> Option<()> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => {
            let v = c.as_slice::<f32>().ok()?;
            let (a, e) = l.contiguous_offsets()?;
            f(&v[a..e]);
            Some(())
        }
        _ => None,
    }
}

/// Copies a slice into a host f32 tensor in place ([`Params::set_flat`]).
struct CopyFrom<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for CopyFrom<'_> {
    fn name(&self) -> &'static str {
        "copy-from"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        let Some((a, e)) = l.contiguous_offsets() else {
            candle_core::bail!("cannot set a non-contiguous parameter");
        };
        match s {
            candle_core::CpuStorage::F32(v) if e - a == self.0.len() => {
                v[a..e].copy_from_slice(self.0);
                Ok(())
            }
            _ => candle_core::bail!("parameter of {} values set from {}", e - a, self.0.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_parameter_count() {
        assert_eq!(GpoConfig::official(4096).param_count(), 1_188_354);
        let p = Params::init(&GpoConfig::official(384), 0, &Device::Cpu).unwrap();
        assert_eq!(p.count(), GpoConfig::official(384).param_count());
        assert_eq!(p.entries()[0].0, "embedder.0.weight");
        assert_eq!(
            p.get("encoder.layers.0.self_attn.in_proj_weight").dims(),
            &[384, 128]
        );
        assert_eq!(p.get("predictor.2.weight").dims(), &[2, 128]);
    }

    #[test]
    fn config_round_trips_through_shapes() {
        let cfg = GpoConfig {
            dim_x: 12,
            d_model: 16,
            dim_feedforward: 24,
            num_layers: 2,
            emb_depth: 3,
            ..Default::default()
        };
        let p = Params::init(&cfg, 1, &Device::Cpu).unwrap();
        let named = p.named_tensors().into_iter().collect();
        assert_eq!(Params::infer_config(&named, cfg.nhead).unwrap(), cfg);
        let q = Params::from_named(&cfg, named).unwrap();
        assert_eq!(q.flat().unwrap(), p.flat().unwrap());
    }

    /// A module of width 8 with `num_layers` layers over x of `dim_x`.
    fn narrow(dim_x: usize, num_layers: usize) -> GpoConfig {
        GpoConfig {
            dim_x,
            d_model: 8,
            dim_feedforward: 8,
            num_layers,
            ..Default::default()
        }
    }

    #[test]
    fn bad_state_dicts_are_rejected_by_name() {
        let cfg = narrow(4, 1);
        let p = Params::init(&cfg, 1, &Device::Cpu).unwrap();
        let mut named: std::collections::HashMap<_, _> = p.named_tensors().into_iter().collect();
        named.insert(
            "predictor.0.bias".into(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Params::from_named(&cfg, named.clone()).unwrap_err();
        assert!(e.contains("predictor.0.bias") && e.contains("[8]"), "{e}");
        named.remove("predictor.0.bias");
        assert!(Params::from_named(&cfg, named)
            .unwrap_err()
            .contains("missing parameter `predictor.0.bias`"));
        assert!(GpoConfig { nhead: 3, ..cfg }.validate().is_err());
    }

    #[test]
    fn set_flat_writes_every_parameter_in_place_and_flat_reads_it_back() {
        let cfg = narrow(6, 2);
        let p = Params::init(&cfg, 3, &Device::Cpu).unwrap();
        let n = p.count();
        let want: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        // A clone shares the variables, as the trainer's module and its copies do.
        let shared = p.clone();
        p.set_flat(&want).unwrap();
        assert_eq!(p.flat().unwrap(), want);
        assert_eq!(shared.flat().unwrap(), want);
        // Each tensor holds its own slice, in `state_dict` order and shape.
        let mut off = 0;
        for (name, v) in p.entries() {
            let k = v.elem_count();
            let got = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, want[off..off + k], "{name}");
            off += k;
        }
        // The wrong length is refused and nothing is written.
        let e = p.set_flat(&want[1..]).unwrap_err().to_string();
        assert!(e.contains(&format!("expected {n}")), "{e}");
        assert_eq!(p.flat().unwrap(), want);
    }
}
