//! DeepSeek-V4 against transformers 5.23.0 (`reference/v4_fixtures.py`): each fixture is a tiny
//! random `DeepseekV4ForCausalLM` saved by `save_pretrained`, with its logits at every position
//! (`tests/fixtures/deepseek_v4/*/expected.safetensors`). mnemo loads the directory as it is and
//! must give the same logits: max |Δ| ≤ 1e-4 of the largest logit (f32 against f32).

use mnemo::model::Workspace;
use mnemo::safetensors_io::TensorFile;
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
        assert!(mnemo::hf_v4::is_v4_dir(&dir), "{name}");
        let model = mnemo::hf_v4::load_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
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
