//! Keep freed heap memory in the process for the next training step.
//!
//! A training step allocates and frees the same large buffers every step (activations,
//! gradients, GEMM outputs and packed operands: ~180 MB at `small`, batch 8 × 256). glibc's
//! `malloc` serves blocks above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
//! with fresh `mmap`s and returns them on `free`, and trims the heap's top past its trim
//! threshold: every step then page-faults its working set back in (the kernel zeroes each 4 KiB
//! page; `perf record -e page-faults` on `bench train-step --precision bf16` shows the GEMM
//! micro-kernel taking faults on its first writes to fresh outputs). Measured on `small` bf16:
//! ~45 k faults per step, and 2–4% of the step (the same settings through `MALLOC_MMAP_MAX_=0
//! MALLOC_TRIM_THRESHOLD_=…`: 921 → 880 ms, 909 → 889 ms, same session).
//!
//! [`keep_freed_memory`] turns both off (`M_MMAP_MAX = 0`, and a trim threshold of 2 GiB, the largest
//! `mallopt` takes): large blocks come from the heap and stay there once freed, so the next step reuses
//! pages that are already mapped. The resident set then stays at the step's peak instead of
//! falling between steps, which is what a training loop wants anyway. Only glibc on Linux has
//! these knobs; elsewhere the call does nothing.

/// Make glibc keep freed memory for reuse (module docs); `true` when the settings took.
/// Process-wide: call it once, early, from commands that run training steps.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // From glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_MAX: c_int = -4;
        // SAFETY: `mallopt` only changes allocator parameters; both values are in range.
        unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// The call succeeds on glibc, and allocation still works after it (a block above the
    /// default mmap threshold, freed and taken again).
    #[test]
    fn keep_freed_memory_takes_and_allocation_still_works() {
        let ok = super::keep_freed_memory();
        assert_eq!(ok, cfg!(all(target_os = "linux", target_env = "gnu")));
        for round in 0..3 {
            let v = vec![round as f32; 1 << 22];
            assert_eq!(v[(1 << 22) - 1], round as f32);
        }
    }
}
