//! DeepSeek-V4 against transformers 5.23.0 (`reference/v4_fixtures.py`): each fixture is a tiny
//! random `DeepseekV4ForCausalLM` saved by `save_pretrained`, with its logits at every position
//! (`tests/fixtures/deepseek_v4/*/expected.safetensors`). mnemo loads the directory as it is and
//! must give the same logits: max |Δ| ≤ 1e-4 of the largest logit (f32 against f32).

use mnemo::io::safetensors::TensorFile;
use mnemo::model::Workspace;
use std::path::PathBuf;

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v4");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "fixtures missing under {}", root.display());
    dirs
}

#[test]
fn deepseek_v4_logits_match_transformers() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(mnemo::io::hf_v4::is_v4_dir(&dir), "{name}");
        let model = mnemo::io::hf_v4::load_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
        let ids = exp.u32("input_ids").unwrap();
        let want = exp.f32("logits", None).unwrap();
        let t = ids.len();
        let mut ws = Workspace::default();
        model.forward(&ids, 1, t, &mut ws);
        assert_eq!(ws.logits.len(), want.len(), "{name}");
        let top = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (a, b)) in ws.logits.iter().zip(&want).enumerate() {
            if (a - b).abs() > worst {
                (worst, at) = ((a - b).abs(), i);
            }
        }
        let v = model.cfg.vocab_size;
        eprintln!(
            "{name}: max |Δlogit| {worst:.2e} (largest logit {top:.2}) at position {}",
            at / v
        );
        assert!(
            worst <= 1e-4 * top.max(1.0),
            "{name}: logits differ by {worst} at position {} token {} (largest logit {top})",
            at / v,
            at % v
        );
    }
}

/// Every position's logits by the cached driver, feeding `chunk` tokens per call (1: prefill
/// of one token, then one-token decoding).
fn cached_logits(model: &mnemo::model::Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    use mnemo::batch::BatchSeq;
    use mnemo::model::KvCache;
    let mut cache = KvCache::new(model);
    let mut out = Vec::new();
    for c in ids.chunks(chunk) {
        let mut seq = [BatchSeq {
            tokens: c,
            cache: &mut cache,
            logits_from: 0,
        }];
        out.extend(model.forward_batch(&mut seq).unwrap().remove(0));
    }
    out
}

/// Largest |a − b| and the largest |b|.
fn worst(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let top = b.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let w = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    (w, top)
}

#[test]
fn deepseek_v4_cached_decoding_matches_transformers() {
    use mnemo::batch::BatchSeq;
    use mnemo::model::KvCache;
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = mnemo::io::hf_v4::load_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
        let ids = exp.u32("input_ids").unwrap();
        let want = exp.f32("logits", None).unwrap();
        // One token at a time, odd chunks (entries completing inside a chunk), one prefill.
        for chunk in [1, 3, 7, ids.len()] {
            let got = cached_logits(&model, &ids, chunk);
            let (w, top) = worst(&got, &want);
            eprintln!("{name}: chunks of {chunk}: max |Δlogit| {w:.2e} (largest {top:.2})");
            assert!(w <= 1e-4 * top.max(1.0), "{name}: chunk {chunk}: {w}");
        }
        // Two sequences in one batch give what each gives alone.
        let v = model.cfg.vocab_size;
        let t = ids.len();
        let other: Vec<u32> = ids.iter().rev().copied().collect();
        let (mut c1, mut c2) = (KvCache::new(&model), KvCache::new(&model));
        let mut seqs = [
            BatchSeq {
                tokens: &ids[..t - 2],
                cache: &mut c1,
                logits_from: 0,
            },
            BatchSeq {
                tokens: &other[..5],
                cache: &mut c2,
                logits_from: 4,
            },
        ];
        let out = model.forward_batch(&mut seqs).unwrap();
        let (w, top) = worst(&out[0], &want[..(t - 2) * v]);
        assert!(w <= 1e-4 * top.max(1.0), "{name}: batched row 0: {w}");
        let alone = cached_logits(&model, &other[..5], 5);
        let (w, top) = worst(&out[1], &alone[4 * v..]);
        assert!(w <= 1e-5 * top.max(1.0), "{name}: batched row 1: {w}");
        // Roll back 5 positions (rejected drafts) and feed the same tokens again.
        c1.truncate(t - 7).unwrap();
        let mut seq = [BatchSeq {
            tokens: &ids[t - 7..],
            cache: &mut c1,
            logits_from: 0,
        }];
        let again = model.forward_batch(&mut seq).unwrap().remove(0);
        let (w, top) = worst(&again, &want[(t - 7) * v..]);
        assert!(w <= 1e-4 * top.max(1.0), "{name}: after a rollback: {w}");
        assert!(c1.kv_bytes() > 0, "{name}");
    }
}

/// Where transformers keeps the gradient of each saved tensor: `meta.json → checkpoint_keys`
/// maps its in-memory names to the saved keys (experts: slices of the fused tensors).
fn reference_grad(
    exp: &TensorFile,
    meta: &serde_json::Value,
    key: &str,
    len: usize,
) -> Option<Vec<f32>> {
    for (param, keys) in meta["checkpoint_keys"].as_object()? {
        for k in keys.as_array()? {
            if k["key"] != key {
                continue;
            }
            let g = exp.f32(&format!("grad.{param}"), None).ok()?;
            let Some(slice) = k["slice_of_param"].as_str() else {
                return Some(g);
            };
            // "[e, :I, :]" (w1), "[e, I:, :]" (w3) of gate_up_proj [E, 2I, D]; "[e, :, :]" of
            // down_proj [E, D, I].
            let parts: Vec<&str> = slice.trim_matches(['[', ']']).split(", ").collect();
            let e: usize = parts[0].parse().ok()?;
            let (block, off) = match parts[1] {
                ":" => (len, 0),
                p if p.starts_with(':') => (2 * len, 0),
                _ => (2 * len, len),
            };
            return Some(g[e * block + off..e * block + off + len].to_vec());
        }
    }
    None
}

#[test]
fn deepseek_v4_gradients_match_transformers() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = mnemo::io::hf_v4::load_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
        // Python's json writes Infinity for the margins of a top-k that keeps everything.
        let meta = std::fs::read_to_string(dir.join("meta.json"))
            .unwrap()
            .replace("-Infinity", "null")
            .replace("Infinity", "null");
        let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let ids = exp.u32("input_ids").unwrap();
        let t = ids.len();
        let mut targets = ids[1..].to_vec();
        targets.push(mnemo::kernels::cross_entropy::IGNORE);
        let mut ws = Workspace::default();
        let mut grads = vec![0.0f32; model.layout.total];
        // The LM loss alone (training adds the indexer's own KL loss, which transformers does
        // not have: its indexer gets no gradient, and neither does mnemo's from the LM loss).
        let lm_only = mnemo::dsa::DsaRun {
            stage: mnemo::config::DsaStage::Sparse,
            kl: false,
            recall: false,
        };
        let loss =
            model.forward_backward_dsa(&ids, &targets, 1, t, &mut grads, 1.0, &mut ws, lm_only);
        let want_loss = exp.f32("loss", None).unwrap()[0] as f64;
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "{name}: loss {loss} vs {want_loss}"
        );
        let (mut checked, mut worst, mut worst_name) = (0, 0.0f64, String::new());
        for spec in &model.layout.tensors {
            let key = mnemo::io::hf_v4::hf_name(&spec.name);
            let Some(want) = reference_grad(&exp, &meta, &key, spec.len()) else {
                continue; // hash layers' correction bias: not in the checkpoint
            };
            let got = &grads[spec.range()];
            assert_eq!(got.len(), want.len(), "{name}: {}", spec.name);
            let diff: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            let rel = diff.sqrt() / norm.sqrt().max(1e-6);
            if rel > worst {
                (worst, worst_name) = (rel, spec.name.clone());
            }
            assert!(
                rel < 1e-3,
                "{name}: gradient of {} ({key}) off by {rel:.2e} (‖ref‖ {:.2e})",
                spec.name,
                norm.sqrt()
            );
            checked += 1;
        }
        eprintln!("{name}: loss {loss:.6}, {checked} gradients, worst {worst:.2e} ({worst_name})");
        assert!(checked > 40, "{name}: only {checked} tensors compared");
    }
}

/// A model exported in transformers' layout loads back to the same parameters, hash tables and
/// config: the fixtures (written by transformers) and a freshly initialised `v4-tiny`. The MTP
/// blocks are not exported (transformers has none): `v4-tiny`'s comes back as the main model
/// (`num_nextn_predict_layers` is written; without `mtp.*` tensors the load drops it).
#[test]
fn deepseek_v4_export_roundtrips() {
    let tmp = std::env::temp_dir().join(format!("mnemo-v4-export-{}", std::process::id()));
    let mut models: Vec<mnemo::model::Model> = fixtures()
        .iter()
        .map(|d| mnemo::io::hf_v4::load_dir(d).unwrap())
        .collect();
    let mut tiny =
        mnemo::model::Model::new(mnemo::config::ModelConfig::preset("v4-tiny").unwrap()).unwrap();
    tiny.init(3);
    models.push(tiny);
    for m in models {
        mnemo::io::hf_v4::export(&m, None, &tmp).unwrap();
        let back = mnemo::io::hf_v4::load_dir(&tmp).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            written["num_nextn_predict_layers"].as_u64(),
            Some(m.cfg.mtp_layers() as u64)
        );
        let main = m.cfg.without_mtp();
        // The architecture (what config.json carries; training settings stay in mnemo's runs).
        let hf = |c| mnemo::io::hf_v4::config_to_hf(c).unwrap();
        assert_eq!(hf(&back.cfg), hf(&main));
        assert_eq!(back.cfg.v4, main.v4);
        assert!(
            back.params[..] == m.params[..m.layout.main_total],
            "parameters differ after the round trip"
        );
        assert_eq!(back.hash_tables[..], m.hash_tables[..m.cfg.n_layers]);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Bad checkpoints say what is wrong: a missing tensor is listed, an unsupported compression
/// ratio names the layer and the value.
#[test]
fn deepseek_v4_bad_checkpoints_name_the_problem() {
    let src = fixtures().remove(0);
    let tmp = std::env::temp_dir().join(format!("mnemo-v4-bad-{}", std::process::id()));
    let m = mnemo::io::hf_v4::load_dir(&src).unwrap();
    mnemo::io::hf_v4::export(&m, None, &tmp).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap()).unwrap();
    // One more layer than the weights hold.
    let mut more = cfg.clone();
    more["num_hidden_layers"] = (m.cfg.n_layers + 1).into();
    let types = more["layer_types"].as_array_mut().unwrap();
    types.push("sliding_attention".into());
    let mlp = more["mlp_layer_types"].as_array_mut().unwrap();
    mlp.push("moe".into());
    std::fs::write(tmp.join("config.json"), more.to_string()).unwrap();
    let e = match mnemo::io::hf_v4::load_dir(&tmp) {
        Ok(_) => panic!("a config with a layer the weights lack loaded"),
        Err(e) => format!("{e:#}"),
    };
    let last = m.cfg.n_layers;
    assert!(
        e.contains("missing") && e.contains(&format!("model.layers.{last}.attn.wq_a.weight")),
        "{e}"
    );
    // A legacy compress_ratios entry transformers does not take.
    let mut bad = cfg.clone();
    bad.as_object_mut().unwrap().remove("layer_types");
    bad["compress_ratios"] = serde_json::json!([0, 4, 64, 4]);
    let e = format!("{:#}", mnemo::io::hf_v4::config_from_hf(&bad).unwrap_err());
    assert!(e.contains("compress_ratios[2]") && e.contains("64"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A directory that does carry `mtp.*` tensors (the official checkpoint's names, e.g. from the
/// released checkpoint: transformers ignores them) loads them into the MTP blocks.
#[test]
fn deepseek_v4_mtp_tensors_load_by_their_official_names() {
    use mnemo::io::safetensors::{serialize_mixed, Data, TensorFile};
    let tmp = std::env::temp_dir().join(format!("mnemo-v4-mtp-{}", std::process::id()));
    let mut m =
        mnemo::model::Model::new(mnemo::config::ModelConfig::preset("v4-tiny").unwrap()).unwrap();
    m.init(4);
    mnemo::io::hf_v4::export(&m, None, &tmp).unwrap();
    let path = tmp.join("model.safetensors");
    let f = TensorFile::open(&path).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut tables = Vec::new();
    for name in f.names() {
        if name.ends_with("tid2eid") {
            let tab = f.u32(&name).unwrap();
            tables.push((name, tab));
        } else {
            data.push((name.clone(), Vec::new(), f.f32(&name, None).unwrap()));
        }
    }
    drop(f);
    for (name, shape, _) in data.iter_mut() {
        *shape = m
            .layout
            .tensors
            .iter()
            .find(|t| mnemo::io::hf_v4::hf_name(&t.name) == *name)
            .map(|t| t.shape.clone())
            .unwrap_or_else(|| panic!("{name}"));
    }
    let mtp: Vec<_> = m
        .layout
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("mtp.0."))
        .collect();
    assert!(mtp.iter().any(|t| t.name == "mtp.0.hc_attn_fn"));
    let mut tensors: Vec<(String, Vec<usize>, Data)> = data
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), Data::F32(d)))
        .collect();
    for t in &mtp {
        tensors.push((
            t.name.clone(),
            t.shape.clone(),
            Data::F32(&m.params[t.range()]),
        ));
    }
    let (v, k) = (m.cfg.vocab_size, m.cfg.top_k);
    for (name, tab) in &tables {
        let ints = tab.iter().map(|&e| e as i64).collect();
        tensors.push((name.clone(), vec![v, k], Data::I64(ints)));
    }
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    std::fs::write(&path, serialize_mixed(&tensors, meta).unwrap()).unwrap();
    let back = mnemo::io::hf_v4::load_dir(&tmp).unwrap();
    assert_eq!(back.cfg.v4, m.cfg.v4);
    assert!(back.params == m.params, "parameters differ");
    // One MTP tensor missing: named.
    tensors.retain(|(n, _, _)| n != "mtp.0.e_proj.weight");
    std::fs::write(
        &path,
        serialize_mixed(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    let e = format!("{:#}", mnemo::io::hf_v4::load_dir(&tmp).err().unwrap());
    assert!(e.contains("missing: mtp.0.e_proj.weight"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}
