//! The tensors of a checkpoint directory, in one safetensors file or split over several.
//!
//! - One file: `model.safetensors`.
//! - Sharded (Hugging Face's convention, also the DeepSeek releases'):
//!   `model.safetensors.index.json`, `{"metadata": {...}, "weight_map": {tensor: file}}`, and
//!   the files it names (`model-00001-of-00002.safetensors`, …) beside it. Every tensor the
//!   index maps must be in its file; a tensor a shard holds but the index does not list is
//!   still a tensor of the checkpoint (so it is reported as unexpected, not lost), and one
//!   held by two files is an error.

use super::safetensors::{RawTensor, TensorFile};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A checkpoint's safetensors files and which one holds each tensor.
pub struct Shards {
    dir: PathBuf,
    files: Vec<TensorFile>,
    /// Tensor name → index into `files`.
    at: HashMap<String, usize>,
}

impl Shards {
    /// Whether `dir` holds a checkpoint's tensors (`model.safetensors` or the index).
    pub fn present(dir: &Path) -> bool {
        dir.join(INDEX_FILE).is_file() || dir.join("model.safetensors").is_file()
    }

    /// Open the tensors of `dir`: the files named by `model.safetensors.index.json` when it
    /// exists, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let ipath = dir.join(INDEX_FILE);
        if !ipath.is_file() {
            let single = dir.join("model.safetensors");
            if !single.is_file() {
                bail!(
                    "{}: no model.safetensors and no {INDEX_FILE}",
                    dir.display()
                );
            }
            let f = TensorFile::open(&single)?;
            let at = f.names().into_iter().map(|n| (n, 0)).collect();
            return Ok(Shards {
                dir: dir.to_path_buf(),
                files: vec![f],
                at,
            });
        }
        let text = std::fs::read_to_string(&ipath)
            .with_context(|| format!("cannot read {}", ipath.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", ipath.display()))?;
        let map = v["weight_map"].as_object().with_context(|| {
            format!(
                "{}: no `weight_map` object (tensor name → file)",
                ipath.display()
            )
        })?;
        // File names in a stable order, each opened once.
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: `weight_map[\"{name}\"]` is {file}, not a file name",
                    ipath.display()
                )
            })?;
            let p = Path::new(file);
            if p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!(
                    "{}: `weight_map[\"{name}\"]` = {file:?} is not a file inside {}",
                    ipath.display(),
                    dir.display()
                );
            }
            wanted.entry(file).or_default().push(name.as_str());
        }
        let mut files = Vec::new();
        let mut at = HashMap::new();
        for (file, names) in wanted {
            let f = TensorFile::open(&dir.join(file)).with_context(|| {
                format!(
                    "{}: shard {file} (tensor `{}`{}) cannot be read",
                    ipath.display(),
                    names[0],
                    match names.len() {
                        1 => String::new(),
                        n => format!(" and {} more", n - 1),
                    }
                )
            })?;
            for name in names {
                if !f.contains(name) {
                    bail!(
                        "{}: maps tensor `{name}` to {file}, which does not hold it",
                        ipath.display()
                    );
                }
                at.insert(name.to_string(), files.len());
            }
            files.push(f);
        }
        // Tensors a shard holds beyond the index: kept (so they are seen), once.
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                match at.get(&name) {
                    Some(&j) if j != i && !map.contains_key(&name) => {
                        bail!(
                            "{}: tensor `{name}` is in both {} and {}",
                            dir.display(),
                            files[j].path().display(),
                            f.path().display()
                        )
                    }
                    Some(_) => {}
                    None => {
                        at.insert(name, i);
                    }
                }
            }
        }
        Ok(Shards {
            dir: dir.to_path_buf(),
            files,
            at,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.at.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.at.contains_key(name)
    }

    /// The file that holds `name`.
    pub fn file(&self, name: &str) -> Result<&TensorFile> {
        self.at
            .get(name)
            .map(|&i| &self.files[i])
            .with_context(|| format!("{}: tensor `{name}` is missing", self.dir.display()))
    }

    /// Tensor `name` as stored, with the file that holds it.
    pub fn raw(&self, name: &str) -> Result<(RawTensor<'_>, &TensorFile)> {
        let f = self.file(name)?;
        let t = f
            .raw(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", f.path().display()))?;
        Ok((t, f))
    }

    /// Tensor `name`'s bytes as a range of its file's mapping (nothing is read).
    pub fn shared(&self, name: &str) -> Result<crate::kernels::qbytes::QBytes> {
        let f = self.file(name)?;
        f.shared(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", f.path().display()))
    }

    /// [`TensorFile::f32`] on the file that holds `name`.
    pub fn f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>> {
        self.file(name)?.f32(name, shape)
    }

    /// [`TensorFile::u32_shaped`] on the file that holds `name`.
    pub fn u32_shaped(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<u32>> {
        self.file(name)?.u32_shaped(name, shape)
    }

    /// The files, for messages: `DIR/model.safetensors` or `DIR (N shards)`.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [f] => f.path().display().to_string(),
            fs => format!("{} ({} shards)", self.dir.display(), fs.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::serialize;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mnemo-shards-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(dir: &Path, file: &str, names: &[&str]) {
        let t: Vec<(String, Vec<usize>, &[f32])> = names
            .iter()
            .map(|n| (n.to_string(), vec![2], &[1.0f32, 2.0][..]))
            .collect();
        std::fs::write(dir.join(file), serialize(&t, HashMap::new()).unwrap()).unwrap();
    }

    fn index(dir: &Path, map: &[(&str, &str)]) {
        let m: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let v = serde_json::json!({"metadata": {}, "weight_map": m});
        std::fs::write(dir.join(INDEX_FILE), v.to_string()).unwrap();
    }

    #[test]
    fn single_file_and_sharded_directories() {
        let d = tmp("one");
        write(&d, "model.safetensors", &["a", "b"]);
        let s = Shards::open(&d).unwrap();
        assert_eq!(s.names(), ["a", "b"]);
        assert_eq!(s.f32("b", Some(&[2])).unwrap(), [1.0, 2.0]);
        assert!(s.describe().ends_with("model.safetensors"));

        let d = tmp("two");
        write(&d, "m-1.safetensors", &["a", "b"]);
        write(&d, "m-2.safetensors", &["c", "extra"]);
        index(
            &d,
            &[
                ("a", "m-1.safetensors"),
                ("b", "m-1.safetensors"),
                ("c", "m-2.safetensors"),
            ],
        );
        let s = Shards::open(&d).unwrap();
        // A tensor the index does not list is kept, so a loader can report it.
        assert_eq!(s.names(), ["a", "b", "c", "extra"]);
        assert!(s.file("c").unwrap().path().ends_with("m-2.safetensors"));
        assert!(s.describe().contains("2 shards"));
        let err = format!("{:#}", s.f32("zz", None).unwrap_err());
        assert!(err.contains("`zz` is missing"), "{err}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn bad_indexes_are_named() {
        let d = tmp("bad");
        write(&d, "m-1.safetensors", &["a"]);
        index(&d, &[("a", "m-1.safetensors"), ("b", "m-1.safetensors")]);
        let err = format!("{:#}", Shards::open(&d).err().unwrap());
        assert!(
            err.contains("`b`") && err.contains("m-1.safetensors"),
            "{err}"
        );
        index(&d, &[("a", "m-9.safetensors")]);
        let err = format!("{:#}", Shards::open(&d).err().unwrap());
        assert!(err.contains("m-9.safetensors"), "{err}");
        index(&d, &[("a", "../m-1.safetensors")]);
        let err = format!("{:#}", Shards::open(&d).err().unwrap());
        assert!(err.contains("not a file inside"), "{err}");
        std::fs::write(d.join(INDEX_FILE), "{\"weight_map\": 3}").unwrap();
        let err = format!("{:#}", Shards::open(&d).err().unwrap());
        assert!(err.contains("weight_map"), "{err}");
        // Two shards holding one tensor the index does not list.
        write(&d, "m-2.safetensors", &["x", "dup"]);
        write(&d, "m-3.safetensors", &["y", "dup"]);
        index(
            &d,
            &[
                ("a", "m-1.safetensors"),
                ("x", "m-2.safetensors"),
                ("y", "m-3.safetensors"),
            ],
        );
        let err = format!("{:#}", Shards::open(&d).err().unwrap());
        assert!(err.contains("`dup` is in both"), "{err}");
        let d2 = tmp("none");
        let err = format!("{:#}", Shards::open(&d2).err().unwrap());
        assert!(err.contains("no model.safetensors"), "{err}");
        std::fs::remove_dir_all(&d).ok();
        std::fs::remove_dir_all(&d2).ok();
    }
}
