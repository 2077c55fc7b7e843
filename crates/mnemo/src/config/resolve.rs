//! Config resolution: the run config of a command line — a preset (or the settings of an
//! `--init` run), then a JSON config file, the flags, and `--set KEY=VALUE` overrides — merged
//! as JSON, deserialised into a [`RunConfig`] (unknown fields are errors) and validated. Shared
//! by `mnemo config`, `mnemo train` and the benchmarks; the CLI only parses the arguments into
//! [`ConfigSources`].
//!
//! Reading the model of an `--init` run that has no `run.json` (a checkpoint directory, a GGUF
//! file, a Hugging Face directory) is the checkpoint loader's job, so [`resolve_with`] takes it
//! as an argument; `crate::config_resolve::resolve` passes the checkpoint loader.

use super::{CorpusSpec, DsaStage, EngramConfig, ModelConfig, Precision, RunConfig, SyntheticLoss};
use super::{Task, TrainConfig};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where a run config comes from: the config flags of the command line, all optional (error
/// messages name them as flags: `--set`, `--init`, `--rope-scaling-factor`, …).
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    /// Model preset [default: the config file's `preset`, else `tiny`].
    pub preset: Option<String>,
    /// JSON config file: `{"preset": ..., "model": {...}, "train": {...}, "data": {...}}`.
    pub config: Option<PathBuf>,
    /// `KEY=VALUE` overrides (`d_model=512`, `train.lr=1e-3`, `engram.layer_ids=[1,3]`, …).
    pub sets: Vec<String>,
    /// Data directory (`data.root`).
    pub data: Option<PathBuf>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// `train.max_steps`.
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    /// `train.lr` (and `train.min_lr` = lr / 10).
    pub lr: Option<f32>,
    pub seed: Option<u64>,
    pub dsa_stage: Option<DsaStage>,
    /// `train.precision` (`--precision f32|bf16`).
    pub precision: Option<Precision>,
    /// A run whose settings replace the preset's (`--init RUN_DIR`).
    pub init: Option<PathBuf>,
    /// YaRN RoPE scaling factor over the original context.
    pub rope_scaling_factor: Option<f64>,
    /// Synthetic long-context task (`niah`, `vt`, `mix`), its share and its loss targets.
    pub synthetic: Option<String>,
    pub synthetic_mix: Option<f64>,
    pub synthetic_loss: Option<String>,
}

/// Reads the model config of an `--init` run that has no `run.json` (a checkpoint directory or
/// an imported model).
pub type InitModel<'a> = &'a dyn Fn(&Path) -> Result<ModelConfig>;

/// The model/train/data settings of an `--init` run: its `run.json` (or, for a checkpoint or
/// imported model without one, its model config from `init_model` with default training
/// settings).
fn init_base(init: &Path, init_model: InitModel) -> Result<serde_json::Value> {
    let run_json = init.join("run.json");
    if run_json.is_file() {
        let s = std::fs::read_to_string(&run_json)
            .with_context(|| format!("--init: cannot read {}", run_json.display()))?;
        let run: RunConfig = serde_json::from_str(&s)
            .with_context(|| format!("--init: {} is not a valid run config", run_json.display()))?;
        return Ok(serde_json::to_value(run)?);
    }
    let model = init_model(init).with_context(|| format!("--init {}", init.display()))?;
    Ok(serde_json::json!({
        "model": model,
        "train": TrainConfig::default(),
        "data": CorpusSpec::new(PathBuf::from(".")),
    }))
}

/// The run config of `a` and the name of its preset: preset → config file → flags → `--set`
/// (or the `--init` run's settings in place of the preset), then deserialised (unknown fields
/// are errors) and validated. `init_model` reads the model of an `--init` run without a
/// `run.json`.
pub fn resolve_with(a: &ConfigSources, init_model: InitModel) -> Result<(RunConfig, String)> {
    let mut file: serde_json::Value = serde_json::json!({});
    if let Some(p) = &a.config {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read config file {}", p.display()))?;
        file = serde_json::from_str(&s)
            .with_context(|| format!("config file {} is not valid JSON", p.display()))?;
        if !file.is_object() {
            bail!("config file {} must hold a JSON object", p.display());
        }
    }
    let init = a
        .init
        .as_ref()
        .map(|p| init_base(p, init_model))
        .transpose()?;
    let preset = a
        .preset
        .clone()
        .or_else(|| {
            file.get("preset")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "tiny".into());
    let model = ModelConfig::preset(&preset).with_context(|| {
        format!(
            "unknown preset `{preset}` (available: {})",
            ModelConfig::PRESETS.join(", ")
        )
    })?;
    let data_root = a.data.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut v = match init {
        Some(base) => base,
        None => serde_json::json!({
            "model": model,
            "train": TrainConfig::default(),
            "data": CorpusSpec::new(data_root),
        }),
    };
    if v["train"].get("synthetic").is_none() {
        v["train"]["synthetic"] = serde_json::Value::Null;
    }
    if v["train"].get("precision").is_none() {
        v["train"]["precision"] = Precision::F32.name().into();
    }
    if v["train"].get("keep_steps").is_none() {
        v["train"]["keep_steps"] = serde_json::json!([]);
    }
    // Optional model fields that a plain config does not serialise, so that `--set` finds them.
    for (k, val) in ModelConfig::optional_fields() {
        if v["model"].get(k).is_none() {
            v["model"][k] = val;
        }
    }
    for section in ["model", "train", "data"] {
        if let Some(obj) = file.get(section) {
            let o = obj
                .as_object()
                .with_context(|| format!("config file: `{section}` must be an object"))?;
            for (k, val) in o {
                v[section][k] = val.clone();
            }
        }
    }
    if let Some(obj) = file.as_object() {
        for k in obj.keys() {
            if !["preset", "model", "train", "data"].contains(&k.as_str()) {
                bail!("config file: unknown top-level key `{k}` (expected preset, model, train, data)");
            }
        }
    }
    let t = &mut v["train"];
    if let Some(x) = a.steps {
        t["max_steps"] = x.into();
    }
    if let Some(x) = a.batch_size {
        t["batch_size"] = x.into();
    }
    if let Some(x) = a.seq_len {
        t["seq_len"] = x.into();
    }
    if let Some(x) = a.lr {
        t["lr"] = x.into();
        t["min_lr"] = (x / 10.0).into();
    }
    if let Some(x) = a.seed {
        t["seed"] = x.into();
    }
    if let Some(x) = a.dsa_stage {
        t["dsa_stage"] = x.name().into();
    }
    if let Some(x) = a.precision {
        t["precision"] = x.name().into();
    }
    if let Some(task) = &a.synthetic {
        let task: Task = task.parse().context("--synthetic")?;
        let loss: SyntheticLoss = a
            .synthetic_loss
            .as_deref()
            .unwrap_or("all")
            .parse()
            .context("--synthetic-loss")?;
        t["synthetic"] = serde_json::json!({
            "task": task,
            "fraction": a.synthetic_mix.unwrap_or(1.0),
            "loss": loss,
        });
    }
    if let Some(f) = a.rope_scaling_factor {
        let m: ModelConfig =
            serde_json::from_value(v["model"].clone()).context("invalid model config")?;
        let orig = m
            .rope_scaling
            .as_ref()
            .map_or(m.max_seq_len, |r| r.original_max_position_embeddings);
        let mut rs = m
            .rope_scaling
            .clone()
            .unwrap_or_else(|| crate::kernels::rope::RopeScaling::yarn(f, orig));
        rs.factor = f;
        if !(f.is_finite() && f >= 1.0) {
            bail!("--rope-scaling-factor {f}: must be a number >= 1");
        }
        v["model"]["max_seq_len"] = rs.max_context().into();
        v["model"]["rope_scaling"] = serde_json::to_value(rs)?;
    }
    if a.data.is_some() {
        v["data"]["root"] = serde_json::to_value(a.data.clone())?;
    }
    if !a.include.is_empty() {
        v["data"]["include"] = serde_json::to_value(&a.include)?;
    }
    if !a.exclude.is_empty() {
        v["data"]["exclude"] = serde_json::to_value(&a.exclude)?;
    }
    // A `--set` whose value has the wrong type is named with its field: the config is checked
    // after each one that changes a config that was valid before it.
    let mut valid = serde_json::from_value::<RunConfig>(v.clone()).is_ok();
    for s in &a.sets {
        if valid {
            apply_set(&mut v, s)?;
            if let Err(e) = serde_json::from_value::<RunConfig>(v.clone()) {
                let key = s.split_once('=').map_or(s.as_str(), |x| x.0);
                bail!("--set {s}: bad value for `{key}`: {e}");
            }
        } else {
            apply_set(&mut v, s)?;
            valid = serde_json::from_value::<RunConfig>(v.clone()).is_ok();
        }
    }
    let run: RunConfig = serde_json::from_value(v).context("invalid config")?;
    run.model.validate()?;
    run.train.validate(&run.model)?;
    Ok((run, preset))
}

/// Apply one `--set KEY=VALUE` to the config JSON.
fn apply_set(v: &mut serde_json::Value, s: &str) -> Result<()> {
    let (key, val) = s
        .split_once('=')
        .with_context(|| format!("--set {s}: expected KEY=VALUE"))?;
    let parsed: serde_json::Value =
        serde_json::from_str(val).unwrap_or_else(|_| serde_json::Value::String(val.to_string()));
    // `engram.FIELD` / `model.engram.FIELD`: one field of the Engram config (the preset's,
    // or the defaults when the preset has none); `engram=null` turns it off.
    if let Some(f) = key
        .strip_prefix("model.engram.")
        .or_else(|| key.strip_prefix("engram."))
    {
        let e = &mut v["model"]["engram"];
        if e.is_null() {
            *e = serde_json::to_value(EngramConfig::default())?;
        }
        e[f] = parsed;
        return Ok(());
    }
    // `dsa.FIELD` / `model.dsa.FIELD`: one field of the DSA config (the preset's, or
    // the tiny-dsa values when the preset has none); `dsa=null` turns it off.
    if let Some(f) = key
        .strip_prefix("model.dsa.")
        .or_else(|| key.strip_prefix("dsa."))
    {
        let e = &mut v["model"]["dsa"];
        if e.is_null() {
            *e = serde_json::to_value(ModelConfig::preset("tiny-dsa").and_then(|c| c.dsa))?;
        }
        if e.get(f).is_none() {
            bail!("--set {s}: no DSA config field `{f}` (index_n_heads, index_head_dim, index_rope_dim, index_topk)");
        }
        e[f] = parsed;
        return Ok(());
    }
    // `v4.FIELD` / `model.v4.FIELD`: one field of the DeepSeek-V4 attention config (the
    // preset's, or the v4-tiny values when the preset has none); `v4=null` turns it off.
    if let Some(f) = key
        .strip_prefix("model.v4.")
        .or_else(|| key.strip_prefix("v4."))
    {
        let e = &mut v["model"]["v4"];
        if e.is_null() {
            *e = serde_json::to_value(ModelConfig::preset("v4-tiny").and_then(|c| c.v4))?;
        }
        if e.get(f).is_none() {
            let names: Vec<&str> = e
                .as_object()
                .map(|o| o.keys().map(|k| k.as_str()).collect())
                .unwrap_or_default();
            bail!(
                "--set {s}: no DeepSeek-V4 config field `{f}` ({})",
                names.join(", ")
            );
        }
        // Fewer MTP blocks drop their trailing `layer_types` entries (one per block).
        if let (Some(n), Some(layers)) = (parsed.as_u64(), v["model"]["n_layers"].as_u64()) {
            if f == "num_nextn_predict_layers" {
                if let Some(t) = v["model"]["v4"]["layer_types"].as_array_mut() {
                    t.truncate((layers + n) as usize);
                }
            }
        }
        v["model"]["v4"][f] = parsed;
        return Ok(());
    }
    let (section, field) = match key.split_once('.') {
        Some((sec, f)) => (sec.to_string(), f.to_string()),
        None => {
            let sec = ["model", "train", "data"]
                .into_iter()
                .find(|sec| v[*sec].get(key).is_some())
                .with_context(|| {
                    format!("--set {s}: no config field named `{key}` (see `mnemo config`)")
                })?;
            (sec.to_string(), key.to_string())
        }
    };
    if v.get(&section).is_none() || v[&section].get(&field).is_none() {
        bail!("--set {s}: no config field `{section}.{field}` (see `mnemo config`)");
    }
    v[&section][&field] = parsed;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(a: &ConfigSources) -> Result<(RunConfig, String)> {
        resolve_with(a, &|_| bail!("no --init in these tests"))
    }

    fn sets(s: &[&str]) -> ConfigSources {
        ConfigSources {
            sets: s.iter().map(|x| x.to_string()).collect(),
            ..ConfigSources::default()
        }
    }

    /// Preset, then flags, then `--set` (bare names looked up in model, train, data; `engram.`
    /// fields start from the defaults when the preset has no Engram); bad keys name the field.
    #[test]
    fn preset_flags_and_sets_in_order() {
        let (run, preset) = resolve(&ConfigSources::default()).unwrap();
        assert_eq!(preset, "tiny");
        assert_eq!(run.model, ModelConfig::preset("tiny").unwrap());
        assert_eq!(run.train, TrainConfig::default());
        let a = ConfigSources {
            lr: Some(1e-3),
            steps: Some(40),
            data: Some(PathBuf::from("/data")),
            ..sets(&["train.max_steps=50", "engram.layer_ids=[1,3]"])
        };
        let (run, _) = resolve(&a).unwrap();
        assert_eq!((run.train.lr, run.train.min_lr), (1e-3, 1e-3 / 10.0));
        assert_eq!(run.train.max_steps, 50, "--set comes after the flags");
        assert_eq!(run.data.root, PathBuf::from("/data"));
        assert_eq!(run.model.engram.unwrap().layer_ids, [1, 3]);
        let v4 = ConfigSources {
            preset: Some("v4-tiny".into()),
            ..sets(&["v4.num_nextn_predict_layers=0", "model.v4.index_topk=8"])
        };
        let v = resolve(&v4).unwrap().0.model.v4.unwrap();
        assert_eq!((v.num_nextn_predict_layers, v.index_topk), (0, 8));
        for (s, needle) in [
            ("d_modle=3", "no config field named `d_modle`"),
            ("train.nope=1", "no config field `train.nope`"),
            ("dsa.nope=1", "no DSA config field `nope`"),
            ("v4.nope=1", "no DeepSeek-V4 config field `nope` ("),
            ("n_kv_heads=3", "n_kv_heads"),
            ("novalue", "expected KEY=VALUE"),
            (
                "d_model=abc",
                "--set d_model=abc: bad value for `d_model`: invalid type",
            ),
            ("train.lr=fast", "bad value for `train.lr`"),
        ] {
            let e = format!("{:#}", resolve(&sets(&[s])).unwrap_err());
            assert!(e.contains(needle), "{s}: {e}");
        }
        let e = ConfigSources {
            preset: Some("huge".into()),
            ..ConfigSources::default()
        };
        assert!(format!("{:#}", resolve(&e).unwrap_err()).contains("unknown preset `huge`"));
    }

    /// `train.precision`: f32 by default (and then not written to JSON), bf16 from the flag or
    /// `--set`, a bad value named with the accepted ones; a run config saved in bf16 reads back
    /// in bf16 (what a resumed run uses).
    #[test]
    fn precision_from_flag_set_and_json_with_clear_errors() {
        let (run, _) = resolve(&ConfigSources::default()).unwrap();
        assert_eq!(run.train.precision, Precision::F32);
        assert!(serde_json::to_value(&run.train)
            .unwrap()
            .get("precision")
            .is_none());
        let flag = ConfigSources {
            precision: Some(Precision::Bf16),
            ..ConfigSources::default()
        };
        assert_eq!(resolve(&flag).unwrap().0.train.precision, Precision::Bf16);
        let (run, _) = resolve(&sets(&["train.precision=bf16"])).unwrap();
        assert_eq!(run.train.precision, Precision::Bf16);
        let back: RunConfig = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
        assert_eq!(back.train.precision, Precision::Bf16);
        let e = format!("{:#}", resolve(&sets(&["precision=fp16"])).unwrap_err());
        assert!(
            e.contains("--set precision=fp16: bad value for `precision`: unknown variant `fp16`, expected `f32` or `bf16`"),
            "{e}"
        );
        let e = "fp16".parse::<Precision>().unwrap_err();
        assert_eq!(e, "unknown precision `fp16` (expected f32 or bf16)");
    }
}
