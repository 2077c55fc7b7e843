//! Running untrusted programs (model-generated code under evaluation) in a contained
//! subprocess on Linux.
//!
//! Every program runs in its own directory with:
//!
//! - a wall-clock timeout, after which its whole process group (and its pids cgroup, when one
//!   could be made) is killed with `SIGKILL`;
//! - resource limits set between `fork` and `exec` (`setrlimit`): address space
//!   (`RLIMIT_AS`), CPU seconds, file size, processes, open files, and no core dumps;
//! - when the kernel allows unprivileged user namespaces: new user, network and mount
//!   namespaces, so it has no network (only a loopback interface that is down), every mount
//!   of the host is read-only, and the only writable place is its working directory (a
//!   size-limited tmpfs, or a bind mount of the directory itself for a compiler). When the
//!   kernel refuses, the program runs without them and a warning is printed once;
//! - a pids cgroup (v1, when `/sys/fs/cgroup/pids` is writable) bounding the number of its
//!   processes and finding them all when it is killed, even those that left its process group;
//! - an environment of its own: no inherited variables but `PATH` and the locale, `HOME` and
//!   `TMPDIR` in its directory, and every proxy variable pointed at a closed port;
//! - stdin closed and stdout/stderr written to files, of which the first bytes are returned.
//!
//! [`capabilities`] tells which of these mechanisms took effect on this machine.

use anyhow::{Context, Result};
use serde::Serialize;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the sandboxed program may write to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writable {
    /// A fresh tmpfs of [`Limits::tmpfs_bytes`] mounted over the working directory (its
    /// previous contents are hidden); for running generated code.
    Tmpfs,
    /// The working directory itself (bind-mounted writable); for a compiler.
    Dir,
}

/// Resource limits of one run.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time before the process group is killed.
    pub wall: Duration,
    /// `RLIMIT_AS`, bytes.
    pub address_space: u64,
    /// `RLIMIT_CPU`, seconds.
    pub cpu_secs: u64,
    /// `RLIMIT_FSIZE`, bytes (also bounds the captured output files).
    pub file_size: u64,
    /// `RLIMIT_NPROC` and the pids cgroup's `pids.max`.
    pub processes: u64,
    /// Size of the tmpfs of [`Writable::Tmpfs`].
    pub tmpfs_bytes: u64,
    /// Bytes of stdout and of stderr kept.
    pub output_cap: usize,
}

impl Limits {
    /// Limits for running a short test program (Python, or a compiled test binary).
    pub fn program(wall: Duration) -> Limits {
        Limits {
            wall,
            address_space: 2 << 30,
            cpu_secs: wall.as_secs().max(1) + 1,
            file_size: 16 << 20,
            processes: 64,
            tmpfs_bytes: 64 << 20,
            output_cap: 16 << 10,
        }
    }
    /// Limits for a compiler (`rustc` plus its linker).
    pub fn compiler(wall: Duration) -> Limits {
        Limits {
            wall,
            address_space: 8 << 30,
            cpu_secs: wall.as_secs().max(1) * 2,
            file_size: 512 << 20,
            processes: 256,
            tmpfs_bytes: 0,
            output_cap: 16 << 10,
        }
    }
}

/// How one run ended.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if any (9 after a timeout; 24 `SIGXCPU`, 25 `SIGXFSZ`).
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub wall_s: f64,
    /// The first [`Limits::output_cap`] bytes of stdout / stderr (lossy UTF-8).
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Exited on its own with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.code == Some(0)
    }
}

/// Which containment mechanisms work on this machine (probed on first use).
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    /// New user + network + mount namespaces (no network, read-only host filesystem).
    pub namespaces: bool,
    /// A pids cgroup per run.
    pub cgroup_pids: bool,
    /// Resource limits set with `setrlimit` (always).
    pub rlimits: Vec<&'static str>,
    /// `RLIMIT_NPROC` binds (it does not for root, which the kernel exempts).
    pub nproc_enforced: bool,
}

const NS_UNKNOWN: u8 = 0;
const NS_OK: u8 = 1;
const NS_REFUSED: u8 = 2;
static NS_STATE: AtomicU8 = AtomicU8::new(NS_UNKNOWN);
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Allow namespaces to be turned off (`MNEMO_SANDBOX_NO_NS=1`), e.g. to test the fallback.
fn namespaces_wanted() -> bool {
    std::env::var_os("MNEMO_SANDBOX_NO_NS").is_none_or(|v| v.is_empty() || v == "0")
}

/// The containment mechanisms in effect (probing the namespaces with `/bin/true` if no run
/// has yet).
pub fn capabilities() -> Capabilities {
    if NS_STATE.load(Ordering::SeqCst) == NS_UNKNOWN {
        let d = std::env::temp_dir().join(format!(
            "mnemo-sandbox-probe-{}-{}",
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        if std::fs::create_dir_all(&d).is_ok() {
            let _ = run(
                Path::new("/bin/true"),
                &[],
                &d,
                Writable::Tmpfs,
                &Limits::program(Duration::from_secs(10)),
            );
            let _ = std::fs::remove_dir_all(&d);
        }
    }
    Capabilities {
        namespaces: NS_STATE.load(Ordering::SeqCst) == NS_OK,
        cgroup_pids: pids_cgroup_root().is_some(),
        rlimits: vec![
            "RLIMIT_AS",
            "RLIMIT_CPU",
            "RLIMIT_FSIZE",
            "RLIMIT_NPROC",
            "RLIMIT_NOFILE",
            "RLIMIT_CORE=0",
        ],
        nproc_enforced: unsafe { libc::geteuid() } != 0,
    }
}

/// Mount points of this process (for remounting them read-only), with their per-mount flags.
fn mounts() -> &'static [(CString, libc::c_ulong)] {
    static M: OnceLock<Vec<(CString, libc::c_ulong)>> = OnceLock::new();
    M.get_or_init(|| {
        let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in s.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 6 {
                continue;
            }
            let mp = unescape_mountinfo(f[4]);
            let mut flags: libc::c_ulong = 0;
            for o in f[5].split(',') {
                flags |= match o {
                    "nosuid" => libc::MS_NOSUID,
                    "nodev" => libc::MS_NODEV,
                    "noexec" => libc::MS_NOEXEC,
                    "noatime" => libc::MS_NOATIME,
                    "nodiratime" => libc::MS_NODIRATIME,
                    "relatime" => libc::MS_RELATIME,
                    "strictatime" => libc::MS_STRICTATIME,
                    _ => 0,
                };
            }
            if let Ok(c) = CString::new(mp) {
                out.push((c, flags));
            }
        }
        out
    })
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| c.is_ascii_digit()) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The pids cgroup (v1) directory of this process, if we may create children in it.
fn pids_cgroup_root() -> Option<&'static Path> {
    static R: OnceLock<Option<PathBuf>> = OnceLock::new();
    R.get_or_init(|| {
        if std::env::var_os("MNEMO_SANDBOX_NO_CGROUP").is_some_and(|v| !v.is_empty() && v != "0") {
            return None;
        }
        let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = s.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctl, path) = (it.next()?, it.next()?, it.next()?);
            ctl.split(',')
                .any(|c| c == "pids")
                .then(|| path.to_string())
        })?;
        let root = Path::new("/sys/fs/cgroup/pids").join(rel.trim_start_matches('/'));
        let probe = root.join(format!("mnemo-probe-{}", std::process::id()));
        std::fs::create_dir(&probe).ok()?;
        let ok = probe.join("pids.max").is_file();
        let _ = std::fs::remove_dir(&probe);
        ok.then_some(root)
    })
    .as_deref()
}

/// A pids cgroup for one run; killed and removed on drop.
struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    fn new(max: u64) -> Option<PidsCgroup> {
        let root = pids_cgroup_root()?;
        let dir = root.join(format!(
            "mnemo-sandbox-{}-{}",
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&dir).ok()?;
        let cg = PidsCgroup { dir };
        std::fs::write(cg.dir.join("pids.max"), max.to_string()).ok()?;
        Some(cg)
    }
    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
    /// SIGKILL every member until none is left (bounded).
    fn kill_all(&self) {
        for _ in 0..200 {
            let p = self.procs();
            if p.is_empty() {
                return;
            }
            for pid in p {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        self.kill_all();
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Environment variables that route network traffic through a proxy: all pointed at a closed
/// local port.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
];

fn c(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path holds a NUL byte")
}

fn read_capped(path: &Path, cap: usize) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(cap as u64).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Everything the child needs between `fork` and `exec`, prepared beforehand (no allocation
/// happens in the child).
struct ChildPlan {
    dir: CString,
    namespaces: bool,
    writable: Writable,
    tmpfs_opts: CString,
    uid_map: CString,
    gid_map: CString,
    cgroup_procs: Option<CString>,
    /// `RLIMIT_AS`, `RLIMIT_CPU`, `RLIMIT_FSIZE`, `RLIMIT_NPROC`.
    limits: [u64; 4],
}

unsafe fn write_file(path: &[u8], data: &[u8]) -> bool {
    let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let ok = libc::write(fd, data.as_ptr().cast(), data.len()) == data.len() as isize;
    libc::close(fd);
    ok
}

/// Runs in the child after `fork`: only async-signal-safe calls.
unsafe fn child_setup(p: &ChildPlan) -> std::io::Result<()> {
    if libc::setsid() < 0 {
        return Err(std::io::Error::last_os_error());
    }
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    if let Some(procs) = &p.cgroup_procs {
        write_file(procs.as_bytes_with_nul(), b"0");
    }
    let [mem, cpu, fsize, nproc] = p.limits;
    let limits = [
        (libc::RLIMIT_AS, mem),
        (libc::RLIMIT_CPU, cpu),
        (libc::RLIMIT_FSIZE, fsize),
        (libc::RLIMIT_NPROC, nproc),
        (libc::RLIMIT_NOFILE, 256),
        (libc::RLIMIT_CORE, 0),
    ];
    for (res, v) in limits {
        let r = libc::rlimit {
            rlim_cur: v as libc::rlim_t,
            rlim_max: v as libc::rlim_t,
        };
        if libc::setrlimit(res, &r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if p.namespaces {
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Identity-map our uid/gid so files we create (in the tmpfs) have an owner.
        write_file(b"/proc/self/setgroups\0", b"deny");
        write_file(b"/proc/self/uid_map\0", p.uid_map.as_bytes());
        write_file(b"/proc/self/gid_map\0", p.gid_map.as_bytes());
        let null = std::ptr::null::<libc::c_char>();
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        if p.writable == Writable::Dir {
            libc::mount(
                p.dir.as_ptr(),
                p.dir.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            );
        }
        for (mp, flags) in mounts() {
            libc::mount(
                null,
                mp.as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
                std::ptr::null(),
            );
        }
        if p.writable == Writable::Tmpfs {
            libc::mount(
                c"tmpfs".as_ptr(),
                p.dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                p.tmpfs_opts.as_ptr().cast(),
            );
        }
    }
    // Enter the directory again: a mount over it is only seen through a new lookup.
    if libc::chdir(p.dir.as_ptr()) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `program args…` contained (see the module docs) with `dir` (which must exist) as its
/// working directory and only writable place. Errors only when it cannot be started at all.
pub fn run(
    program: &Path,
    args: &[OsString],
    dir: &Path,
    writable: Writable,
    limits: &Limits,
) -> Result<Outcome> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("sandbox directory {}", dir.display()))?;
    // Output goes to files beside the directory (not inside a tmpfs mounted over it).
    let n = RUN_COUNTER.fetch_add(1, Ordering::SeqCst);
    let parent = dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let out_path = parent.join(format!(".sandbox-{n}.stdout"));
    let err_path = parent.join(format!(".sandbox-{n}.stderr"));
    let result = run_inner(program, args, &dir, writable, limits, &out_path, &err_path);
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    result
}

fn run_inner(
    program: &Path,
    args: &[OsString],
    dir: &Path,
    writable: Writable,
    limits: &Limits,
    out_path: &Path,
    err_path: &Path,
) -> Result<Outcome> {
    let cgroup = PidsCgroup::new(limits.processes);
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut namespaces = namespaces_wanted() && NS_STATE.load(Ordering::SeqCst) != NS_REFUSED;
    let base = ChildPlan {
        dir: c(dir)?,
        namespaces,
        writable,
        tmpfs_opts: CString::new(format!("size={},mode=0700", limits.tmpfs_bytes.max(4096)))?,
        uid_map: CString::new(format!("{uid} {uid} 1"))?,
        gid_map: CString::new(format!("{gid} {gid} 1"))?,
        cgroup_procs: match &cgroup {
            Some(cg) => Some(c(&cg.dir.join("cgroup.procs"))?),
            None => None,
        },
        limits: [
            limits.address_space,
            limits.cpu_secs,
            limits.file_size,
            limits.processes,
        ],
    };
    mounts(); // read /proc/self/mountinfo before forking
    loop {
        let plan = std::sync::Arc::new(ChildPlan {
            namespaces,
            dir: base.dir.clone(),
            tmpfs_opts: base.tmpfs_opts.clone(),
            uid_map: base.uid_map.clone(),
            gid_map: base.gid_map.clone(),
            cgroup_procs: base.cgroup_procs.clone(),
            ..base
        });
        let stdout = std::fs::File::create(out_path)
            .with_context(|| format!("cannot create {}", out_path.display()))?;
        let stderr = std::fs::File::create(err_path)
            .with_context(|| format!("cannot create {}", err_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("RUST_BACKTRACE", "0")
            .env("no_proxy", "")
            .env("NO_PROXY", "");
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        for v in PROXY_VARS {
            cmd.env(v, "http://127.0.0.1:9");
        }
        let child_plan = plan.clone();
        // SAFETY: `child_setup` only makes async-signal-safe system calls on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || child_setup(&child_plan));
        }
        let t0 = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e)
                if plan.namespaces
                    && NS_STATE.load(Ordering::SeqCst) == NS_UNKNOWN
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM)
                            | Some(libc::EINVAL)
                            | Some(libc::ENOSPC)
                            | Some(libc::EACCES)
                            | Some(libc::ENOSYS)
                    ) =>
            {
                if NS_STATE.swap(NS_REFUSED, Ordering::SeqCst) != NS_REFUSED {
                    eprintln!(
                        "warning: the kernel refused new user/network/mount namespaces ({e}); \
                         sandboxed programs run without them: network access is not blocked and \
                         only resource limits and a private working directory contain them"
                    );
                }
                namespaces = false;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot start {}", program.display())),
        };
        if plan.namespaces {
            NS_STATE.store(NS_OK, Ordering::SeqCst);
        }
        let pid = child.id() as i32;
        let deadline = t0 + limits.wall;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                if let Some(cg) = &cgroup {
                    cg.kill_all();
                }
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let wall_s = t0.elapsed().as_secs_f64();
        // Whatever it left running in the background goes too.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        drop(cgroup);
        return Ok(Outcome {
            code: status.code(),
            signal: status.signal(),
            timed_out,
            wall_s,
            stdout: read_capped(out_path, limits.output_cap),
            stderr: read_capped(err_path, limits.output_cap),
        });
    }
}
