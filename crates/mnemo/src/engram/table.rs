//! Engram embedding tables: storage (RAM or a memory-mapped file), the multi-head gather, the
//! sparse scatter-add of the backward pass, and lazy (sparse) Adam.
//!
//! A layer's table is `[R, D_h]` with `R = Σ primes` (one block of rows per head, spec §1.3).
//! The forward pass reads `rows: [N, H]` into `e: [N, H·D_h]` (the heads concatenated in
//! (order, head) order, paper eq. 2); the backward pass sums the gradient of `e` into the
//! distinct rows used ([`SparseGrad`]), so its size is the number of rows touched, never `R`.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A raw pointer shared by parallel tasks that write provably disjoint rows.
struct Ptr<T>(*mut T);
unsafe impl<T> Sync for Ptr<T> {}
unsafe impl<T> Send for Ptr<T> {}
impl<T> Ptr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

enum Storage {
    Ram(Vec<f32>),
    /// Read-write or read-only mapping of a raw little-endian f32 file of `rows·dim` values.
    Mapped {
        path: PathBuf,
        bytes: u64,
        map: Mapping,
    },
}

enum Mapping {
    Ro(memmap2::Mmap),
    Rw(memmap2::MmapMut),
}

/// One Engram layer's table, `[rows, dim]` f32.
pub struct EngramTable {
    rows: usize,
    dim: usize,
    storage: Storage,
}

impl std::fmt::Debug for EngramTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.storage {
            Storage::Ram(_) => "ram".to_string(),
            Storage::Mapped { path, .. } => format!("mapped {}", path.display()),
        };
        write!(f, "EngramTable[{}, {}] ({kind})", self.rows, self.dim)
    }
}

impl EngramTable {
    /// An in-RAM table of zeros (pages are only committed when touched).
    pub fn zeros(rows: usize, dim: usize) -> Self {
        EngramTable {
            rows,
            dim,
            storage: Storage::Ram(vec![0.0; rows * dim]),
        }
    }

    /// An in-RAM table ~ N(0, std²) (the demo's `nn.Embedding` init has std 1).
    pub fn normal(rows: usize, dim: usize, rng: &mut crate::rng::Rng, std: f32) -> Self {
        let mut t = Self::zeros(rows, dim);
        if let Storage::Ram(v) = &mut t.storage {
            rng.fill_normal(v, std);
        }
        t
    }

    /// An in-RAM table holding `data` (`rows·dim` values).
    pub fn from_vec(rows: usize, dim: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != rows * dim {
            bail!("engram table: {} values for [{rows}, {dim}]", data.len());
        }
        Ok(EngramTable {
            rows,
            dim,
            storage: Storage::Ram(data),
        })
    }

    /// Map a raw little-endian f32 file holding `[rows, dim]` (written by
    /// [`EngramTable::write_file`]). `writable` maps it shared read-write so that optimiser
    /// updates go to the file. A file of the wrong size is an error.
    pub fn open_mapped(path: &Path, rows: usize, dim: usize, writable: bool) -> Result<Self> {
        if cfg!(target_endian = "big") {
            bail!("engram tables are little-endian f32 files; this machine is big-endian");
        }
        let want = Self::bytes_for(rows, dim);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .with_context(|| format!("cannot open engram table {}", path.display()))?;
        let have = f.metadata()?.len();
        if have != want {
            bail!(
                "engram table {} has {have} bytes; [{rows}, {dim}] f32 needs {want}",
                path.display()
            );
        }
        if want == 0 {
            bail!("engram table {} is empty", path.display());
        }
        // SAFETY: the mapping is only read/written through this table; mnemo never truncates a
        // table file while it is mapped, and `check` detects a file replaced or shortened
        // behind our back before each gather.
        let map = unsafe {
            if writable {
                Mapping::Rw(
                    memmap2::MmapMut::map_mut(&f)
                        .with_context(|| format!("cannot map {}", path.display()))?,
                )
            } else {
                Mapping::Ro(
                    memmap2::Mmap::map(&f)
                        .with_context(|| format!("cannot map {}", path.display()))?,
                )
            }
        };
        Ok(EngramTable {
            rows,
            dim,
            storage: Storage::Mapped {
                path: path.to_path_buf(),
                bytes: want,
                map,
            },
        })
    }

    /// Write the table as a raw little-endian f32 file (atomically).
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let data = self.as_slice();
        // SAFETY: f32 has no padding; the bytes are the little-endian values (checked above).
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        crate::util::write_atomic(path, bytes)
            .with_context(|| format!("cannot write engram table {}", path.display()))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn bytes(&self) -> u64 {
        Self::bytes_for(self.rows, self.dim)
    }
    /// Bytes of a `[rows, dim]` f32 table (in RAM or as a file).
    pub fn bytes_for(rows: usize, dim: usize) -> u64 {
        rows as u64 * dim as u64 * 4
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// For a mapped table: an error if its file vanished or changed size since it was mapped
    /// (reading such a mapping could otherwise fault). Free for RAM tables.
    pub fn check(&self) -> Result<()> {
        if let Storage::Mapped { path, bytes, .. } = &self.storage {
            let m = std::fs::metadata(path).with_context(|| {
                format!("engram table {} vanished while mapped", path.display())
            })?;
            if m.len() != *bytes {
                bail!(
                    "engram table {} changed size while mapped ({} bytes, expected {bytes})",
                    path.display(),
                    m.len()
                );
            }
        }
        Ok(())
    }

    /// All values, `[rows, dim]`.
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Ram(v) => v,
            Storage::Mapped { map, .. } => {
                let b: &[u8] = match map {
                    Mapping::Ro(m) => m,
                    Mapping::Rw(m) => m,
                };
                assert_eq!(b.as_ptr() as usize % 4, 0, "mappings are page aligned");
                // SAFETY: aligned (asserted), length checked at open, any bit pattern is an f32.
                unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
            }
        }
    }

    /// All values, mutably (an error for a read-only mapping).
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Ram(v) => Ok(v),
            Storage::Mapped { map, path, .. } => match map {
                Mapping::Ro(_) => bail!(
                    "engram table {} is mapped read-only and cannot be updated",
                    path.display()
                ),
                Mapping::Rw(m) => {
                    let b: &mut [u8] = m;
                    // SAFETY: as in `as_slice`.
                    Ok(unsafe {
                        std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut f32, b.len() / 4)
                    })
                }
            },
        }
    }

    /// Gather `rows` into `out: [rows.len(), dim]` (the multi-head lookup: with `rows: [N, H]`
    /// from the hash, `out` is `e: [N, H·dim]`). Errors on an out-of-range row or a mapped
    /// file that vanished.
    pub fn gather(&self, rows: &[u32], out: &mut [f32]) -> Result<()> {
        self.check()?;
        let d = self.dim;
        if out.len() != rows.len() * d {
            bail!(
                "engram gather: output of {} values for {} rows of {d}",
                out.len(),
                rows.len()
            );
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= self.rows) {
            bail!(
                "engram gather: row {r} outside a table of {} rows",
                self.rows
            );
        }
        let t = self.as_slice();
        out.par_chunks_mut(d * 64)
            .zip(rows.par_chunks(64))
            .for_each(|(o, rs)| {
                for (o, &r) in o.chunks_mut(d).zip(rs) {
                    let r = r as usize;
                    o.copy_from_slice(&t[r * d..(r + 1) * d]);
                }
            });
        Ok(())
    }

    /// [`EngramTable::gather`] into a new buffer: the prefetch before a layer runs (its rows
    /// depend only on token ids, so it can run ahead of the layers below).
    pub fn prefetch(&self, rows: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; rows.len() * self.dim];
        self.gather(rows, &mut out)?;
        Ok(out)
    }
}

/// Gradient of a table restricted to the rows a batch used: `rows` ascending and distinct,
/// `grad: [rows.len(), dim]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseGrad {
    pub dim: usize,
    pub rows: Vec<u32>,
    pub grad: Vec<f32>,
}

impl SparseGrad {
    /// Scatter-add of `de: [rows.len(), dim]` into the distinct rows of `rows` (the backward of
    /// [`EngramTable::gather`]). Sums run in a fixed order (by row, then by position), so the
    /// result is deterministic.
    pub fn from_gather(rows: &[u32], de: &[f32], dim: usize) -> Self {
        assert_eq!(de.len(), rows.len() * dim);
        let mut order: Vec<u64> = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| ((r as u64) << 32) | i as u64)
            .collect();
        order.par_sort_unstable();
        let mut out = SparseGrad {
            dim,
            rows: Vec::new(),
            grad: Vec::new(),
        };
        for key in order {
            let (r, i) = ((key >> 32) as u32, (key & 0xFFFF_FFFF) as usize);
            if out.rows.last() != Some(&r) {
                out.rows.push(r);
                out.grad.extend_from_slice(&de[i * dim..(i + 1) * dim]);
            } else {
                let n = out.grad.len();
                for (a, b) in out.grad[n - dim..].iter_mut().zip(&de[i * dim..]) {
                    *a += b;
                }
            }
        }
        out
    }

    /// Add `self` into a dense gradient `[R, dim]` (tests, and small tables).
    pub fn add_to_dense(&self, dense: &mut [f32]) {
        let d = self.dim;
        for (k, &r) in self.rows.iter().enumerate() {
            let r = r as usize;
            for (a, b) in dense[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&self.grad[k * d..])
            {
                *a += b;
            }
        }
    }

    /// Add `other` (same table) into `self`: a sorted merge of the row lists, so the result
    /// stays ascending and distinct (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: &SparseGrad) {
        if other.rows.is_empty() {
            return;
        }
        if self.rows.is_empty() {
            *self = other.clone();
            return;
        }
        assert_eq!(
            self.dim, other.dim,
            "engram: sparse gradients of different widths"
        );
        let d = self.dim;
        let mut rows = Vec::with_capacity(self.rows.len() + other.rows.len());
        let mut grad = Vec::with_capacity(self.grad.len() + other.grad.len());
        let (mut i, mut j) = (0, 0);
        while i < self.rows.len() || j < other.rows.len() {
            let a = self.rows.get(i).copied().unwrap_or(u32::MAX);
            let b = other.rows.get(j).copied().unwrap_or(u32::MAX);
            if i < self.rows.len() && (j >= other.rows.len() || a < b) {
                rows.push(a);
                grad.extend_from_slice(&self.grad[i * d..(i + 1) * d]);
                i += 1;
            } else if j < other.rows.len() && (i >= self.rows.len() || b < a) {
                rows.push(b);
                grad.extend_from_slice(&other.grad[j * d..(j + 1) * d]);
                j += 1;
            } else {
                rows.push(a);
                let x = &self.grad[i * d..(i + 1) * d];
                let y = &other.grad[j * d..(j + 1) * d];
                grad.extend(x.iter().zip(y).map(|(p, q)| p + q));
                i += 1;
                j += 1;
            }
        }
        self.rows = rows;
        self.grad = grad;
    }

    /// Multiply every value (gradient scaling / clipping).
    pub fn scale(&mut self, s: f32) {
        self.grad.iter_mut().for_each(|g| *g *= s);
    }

    /// Σ g², for a global gradient norm.
    pub fn sum_sq(&self) -> f64 {
        self.grad.iter().map(|&g| g as f64 * g as f64).sum()
    }
}

/// How lazy Adam corrects the bias of its moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasCorrection {
    /// `t` = the number of updates this row has received (the default): a row's moments are an
    /// average over exactly its own updates, so this is the correct debiasing for them, and a
    /// row first touched late gets a first step of `lr·sign(g)` like any fresh Adam parameter.
    PerRow,
    /// `t` = the global step (PyTorch `SparseAdam`, TF `LazyAdam`): a row first touched at a
    /// late step is barely debiased and its first step is `(1−β₁)/√(1−β₂)·lr` in size.
    Global,
}

/// Hyper-parameters of [`SparseAdam`]; the learning rate is `lr_mult × base lr` (paper: 5×, no
/// weight decay).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparseAdamParams {
    pub lr_mult: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub bias_correction: BiasCorrection,
}

impl Default for SparseAdamParams {
    fn default() -> Self {
        SparseAdamParams {
            lr_mult: 5.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            bias_correction: BiasCorrection::PerRow,
        }
    }
}

/// Lazy Adam for one table: per-row moments, updated only for the rows in a step's gradient
/// (moments of other rows are frozen, not decayed), so a step costs `O(rows used · dim)`. The
/// state arrays are allocated zeroed and only the pages of rows ever touched are committed.
pub struct SparseAdam {
    dim: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates received per row.
    pub row_steps: Vec<u32>,
    /// Optimiser steps taken.
    pub step: u64,
}

impl SparseAdam {
    pub fn new(rows: usize, dim: usize) -> Self {
        SparseAdam {
            dim,
            m: vec![0.0; rows * dim],
            v: vec![0.0; rows * dim],
            row_steps: vec![0; rows],
            step: 0,
        }
    }

    /// One update of `table` with `g` at base learning rate `base_lr`.
    pub fn update(
        &mut self,
        table: &mut EngramTable,
        g: &SparseGrad,
        base_lr: f32,
        h: &SparseAdamParams,
    ) -> Result<()> {
        let d = self.dim;
        if g.dim != d || table.dim() != d || table.rows() != self.row_steps.len() {
            bail!("engram sparse Adam: table, gradient and state shapes differ");
        }
        if g.rows.windows(2).any(|w| w[0] >= w[1]) {
            bail!("engram sparse Adam: gradient rows must be ascending and distinct");
        }
        if let Some(&r) = g.rows.last() {
            if r as usize >= table.rows() {
                bail!("engram sparse Adam: row {r} outside the table");
            }
        }
        self.step += 1;
        let lr = base_lr * h.lr_mult;
        let p = Ptr(table.as_mut_slice()?.as_mut_ptr());
        let mp = Ptr(self.m.as_mut_ptr());
        let vp = Ptr(self.v.as_mut_ptr());
        let global = self.step;
        let steps = Ptr(self.row_steps.as_mut_ptr());
        g.rows
            .par_iter()
            .zip(g.grad.par_chunks(d))
            .with_min_len(64)
            .for_each(|(&r, gr)| {
                let r = r as usize;
                // SAFETY: rows are distinct and in range (checked above), so every task writes
                // its own row of the table, of `m`, `v` and its own `row_steps` entry.
                let (p, m, v, t) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(p.get().add(r * d), d),
                        std::slice::from_raw_parts_mut(mp.get().add(r * d), d),
                        std::slice::from_raw_parts_mut(vp.get().add(r * d), d),
                        &mut *steps.get().add(r),
                    )
                };
                *t += 1;
                let tt = match h.bias_correction {
                    BiasCorrection::PerRow => *t as i32,
                    BiasCorrection::Global => global.min(i32::MAX as u64) as i32,
                };
                let bc1 = 1.0 - (h.beta1 as f64).powi(tt);
                let bc2 = 1.0 - (h.beta2 as f64).powi(tt);
                let step_size = (lr as f64 / bc1) as f32;
                let inv_bc2 = (1.0 / bc2.sqrt()) as f32;
                for i in 0..d {
                    let gi = gr[i];
                    m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                    v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                    p[i] -= step_size * m[i] / (v[i].sqrt() * inv_bc2 + h.eps);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn engram_gather_and_sparse_scatter_add() {
        let (r, d) = (10, 3);
        let data: Vec<f32> = (0..r * d).map(|i| i as f32).collect();
        let t = EngramTable::from_vec(r, d, data.clone()).unwrap();
        let rows = [7u32, 2, 7, 9];
        let e = t.prefetch(&rows).unwrap();
        assert_eq!(&e[..3], &[21.0, 22.0, 23.0]);
        assert_eq!(&e[9..], &[27.0, 28.0, 29.0]);
        assert!(t.prefetch(&[10]).is_err());
        let de: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let g = SparseGrad::from_gather(&rows, &de, d);
        assert_eq!(g.rows, [2, 7, 9]);
        assert_eq!(&g.grad[3..6], &[0.0 + 3.0, 0.5 + 3.5, 1.0 + 4.0]);
        let mut dense = vec![0.0; r * d];
        g.add_to_dense(&mut dense);
        assert_eq!(dense[2 * 3], 1.5);
        assert_eq!(dense.iter().filter(|&&x| x != 0.0).count(), 9);
    }

    #[test]
    fn engram_mapped_table_matches_ram_and_reports_bad_files() {
        let dir = std::env::temp_dir().join(format!("mnemo-engram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.f32");
        let mut rng = Rng::new(3);
        let ram = EngramTable::normal(1000, 8, &mut rng, 1.0);
        ram.write_file(&path).unwrap();
        let mapped = EngramTable::open_mapped(&path, 1000, 8, false).unwrap();
        assert!(mapped.is_mapped());
        let rows = [0u32, 999, 5, 5, 123];
        assert_eq!(
            ram.prefetch(&rows).unwrap(),
            mapped.prefetch(&rows).unwrap()
        );
        // Wrong size: an error naming both sizes.
        let e = EngramTable::open_mapped(&path, 1001, 8, false).unwrap_err();
        assert!(format!("{e:#}").contains("32000 bytes"), "{e:#}");
        // Read-only mappings refuse updates.
        let mut ro = EngramTable::open_mapped(&path, 1000, 8, false).unwrap();
        assert!(ro.as_mut_slice().is_err());
        // A writable mapping takes optimiser updates into the file.
        let mut rw = EngramTable::open_mapped(&path, 1000, 8, true).unwrap();
        let mut opt = SparseAdam::new(1000, 8);
        let g = SparseGrad::from_gather(&[4], &[1.0; 8], 8);
        opt.update(&mut rw, &g, 0.01, &SparseAdamParams::default())
            .unwrap();
        drop(rw);
        let again = EngramTable::open_mapped(&path, 1000, 8, false).unwrap();
        assert!((again.as_slice()[32] - (ram.as_slice()[32] - 0.05)).abs() < 1e-5);
        // A vanished file: gather is an error, not a crash.
        std::fs::remove_file(&path).unwrap();
        let e = mapped.prefetch(&rows).unwrap_err();
        assert!(format!("{e:#}").contains("vanished"), "{e:#}");
        assert!(EngramTable::open_mapped(&path, 1000, 8, false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn engram_sparse_adam_touches_only_used_rows() {
        let mut rng = Rng::new(1);
        let mut t = EngramTable::normal(50, 4, &mut rng, 1.0);
        let before = t.as_slice().to_vec();
        let mut opt = SparseAdam::new(50, 4);
        let h = SparseAdamParams::default();
        let g = SparseGrad::from_gather(&[3, 40, 3], &[0.5; 12], 4);
        opt.update(&mut t, &g, 1e-3, &h).unwrap();
        let after = t.as_slice();
        for r in 0..50 {
            let changed = (0..4).any(|i| after[r * 4 + i] != before[r * 4 + i]);
            assert_eq!(changed, r == 3 || r == 40, "row {r}");
        }
        // First step with per-row bias correction: lr·5·sign(g).
        assert!((before[12] - after[12] - 5e-3).abs() < 1e-6);
        // A row first touched at step 3 still moves by lr·5 (per-row), but by a different
        // amount under global-step correction.
        let g2 = SparseGrad::from_gather(&[3], &[0.5; 4], 4);
        opt.update(&mut t, &g2, 1e-3, &h).unwrap();
        let g3 = SparseGrad::from_gather(&[7], &[0.5; 4], 4);
        let b7 = t.as_slice()[28];
        opt.update(&mut t, &g3, 1e-3, &h).unwrap();
        assert!((b7 - t.as_slice()[28] - 5e-3).abs() < 1e-6);
        assert_eq!((opt.row_steps[3], opt.row_steps[7], opt.step), (2, 1, 3));
        let hg = SparseAdamParams {
            bias_correction: BiasCorrection::Global,
            ..h
        };
        let b8 = t.as_slice()[32];
        let g4 = SparseGrad::from_gather(&[8], &[0.5; 4], 4);
        opt.update(&mut t, &g4, 1e-3, &hg).unwrap();
        let moved = b8 - t.as_slice()[32];
        let want = 5e-3 * (0.1 / (1.0 - 0.9f32.powi(4)))
            / (0.05f32.sqrt() / (1.0 - 0.95f32.powi(4)).sqrt());
        assert!((moved - want).abs() < 1e-6, "{moved} vs {want}");
        // Bad gradients are errors.
        let bad = SparseGrad {
            dim: 4,
            rows: vec![5, 5],
            grad: vec![0.0; 8],
        };
        assert!(opt.update(&mut t, &bad, 1e-3, &h).is_err());
    }

    /// Gather throughput for a table much larger than the CPU caches, in RAM and memory-mapped
    /// (file in the page cache). Run with
    /// `cargo test --release -p mnemo engram_gather_throughput -- --ignored --nocapture`;
    /// `MNEMO_ENGRAM_BENCH_GB` sets the table size (default 2).
    #[test]
    #[ignore]
    fn engram_gather_throughput_ram_vs_mapped() {
        let gb: f64 = std::env::var("MNEMO_ENGRAM_BENCH_GB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2.0);
        let dim = 64;
        let rows = (gb * (1u64 << 30) as f64 / (dim * 4) as f64) as usize;
        let data: Vec<f32> = (0..rows * dim).map(|i| (i % 1021) as f32).collect();
        let ram = EngramTable::from_vec(rows, dim, data).unwrap();
        let path =
            std::env::temp_dir().join(format!("mnemo-engram-bench-{}.f32", std::process::id()));
        ram.write_file(&path).unwrap();
        // 8192 tokens × 16 heads per batch, uniform rows (the worst case: no reuse).
        let mut rng = Rng::new(7);
        let batches: Vec<Vec<u32>> = (0..8)
            .map(|_| {
                (0..8192 * 16)
                    .map(|_| rng.below(rows as u64) as u32)
                    .collect()
            })
            .collect();
        let mut out = vec![0.0f32; 8192 * 16 * dim];
        let mut run = |t: &EngramTable, label: &str| {
            let mut times = vec![];
            for b in &batches {
                let s = std::time::Instant::now();
                t.gather(b, &mut out).unwrap();
                times.push(s.elapsed().as_secs_f64());
            }
            let first = times[0];
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let med = times[times.len() / 2];
            let n = batches[0].len() as f64;
            eprintln!(
                "{label:>8}: {gb:.1} GB table, {n} rows of {} B per gather: first {:.2} ms, median {:.2} ms = {:.1} M rows/s, {:.2} GB/s",
                dim * 4,
                first * 1e3,
                med * 1e3,
                n / med / 1e6,
                n * (dim * 4) as f64 / med / 1e9
            );
        };
        run(&ram, "RAM");
        run(&ram, "RAM 2nd");
        let mapped = EngramTable::open_mapped(&path, rows, dim, false).unwrap();
        run(&mapped, "mapped");
        // Same batches again: their pages are now mapped (no more page faults).
        run(&mapped, "mapped 2nd");
        assert_eq!(
            ram.prefetch(&batches[0]).unwrap(),
            mapped.prefetch(&batches[0]).unwrap()
        );
        drop(mapped);
        std::fs::remove_file(&path).unwrap();
    }
}
